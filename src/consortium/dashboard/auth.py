"""Who may see what: bearer tokens, a users file and per-institution scope.

Without ``--auth-token`` or ``--users`` the dashboard is open (and binds to
127.0.0.1 by default).  With either, every page and API call needs a token:
``Authorization: Bearer <token>`` for programs, or a session cookie that the
login form sets for browsers.  A user either operates the whole consortium
(``institution`` None: sees everything) or belongs to one institution and then
sees only its own alerts, fleet, events, traffic counts, disclosed metrics and
privacy charges; asking for another institution's data is refused with 403.

Tokens are compared as SHA-256 digests in constant time, so a users file may
hold digests only (``token_sha256``) and no token ever needs to sit in a file
that others can read, a log line or a page.

Users file (JSON)::

    {"users": [
      {"name": "operator", "token_sha256": "<64 hex digits>"},
      {"name": "bank-a", "institution": "bank-a", "token": "<at least 16 characters>"}
    ]}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consortium.edge.messages import MessageError, check_name
from consortium.errors import ConfigError

MIN_TOKEN_LENGTH = 16
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class User:
    """An authenticated caller; ``institution`` None means a consortium operator (sees everything)."""

    name: str
    institution: str | None = None

    def may_see(self, institution: str | None) -> bool:
        """Whether this user may read data of ``institution`` (None: all institutions)."""
        return self.institution is None or institution == self.institution


ANONYMOUS = User("anonymous", None)
"""The user of a dashboard started without authentication."""


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token (what a users file may store instead of the token)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Checks tokens and browser sessions.

    Parameters
    ----------
    users : sequence of (str, User)
        ``(sha256 hex digest of the token, user)`` pairs; empty means authentication is off.
    """

    def __init__(self, users: Sequence[tuple[str, User]] = ()) -> None:
        self._users = [(bytes.fromhex(d), u) for d, u in users]
        self._sessions: OrderedDict[str, User] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, *, token: str | None = None, users_file: str | Path | None = None) -> Authenticator:
        """Build from the CLI options ``--auth-token`` and ``--users`` (both may be given)."""
        users: list[tuple[str, User]] = []
        if token is not None:
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(
                    f"The 'auth_token' parameter of the dashboard must be a str of at least {MIN_TOKEN_LENGTH} "
                    f"characters. Got one of {len(token) if isinstance(token, str) else type(token).__name__} "
                    f"characters instead."
                )
            users.append((token_digest(token), User("operator", None)))
        if users_file is not None:
            users.extend(load_users_file(users_file))
        return cls(users)

    @property
    def enabled(self) -> bool:
        """Whether callers must authenticate."""
        return bool(self._users)

    def check_token(self, token: str | None) -> User | None:
        """The user owning ``token``, or None."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, user in self._users:  # no early exit: timing does not tell which entry matched
            if hmac.compare_digest(known, digest):
                found = user
        return found

    def open_session(self, user: User) -> str:
        """A new random session id for a browser that logged in (the cookie value; never the token)."""
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = user
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid

    def session_user(self, sid: str | None) -> User | None:
        """The user of a session cookie, or None."""
        if not sid:
            return None
        with self._lock:
            return self._sessions.get(sid)

    def close_session(self, sid: str | None) -> None:
        """Log a browser out."""
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)


def load_users_file(path: str | Path) -> list[tuple[str, User]]:
    """Read a users file (see the module docstring); errors name the file, entry and field."""
    p = Path(path)
    where = f"users file {str(p)!r}"
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"The {where} does not exist.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"The {where} is not readable JSON: {exc}.") from None
    entries = raw.get("users") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"The {where} must hold {{\"users\": [...]}} with at least one user. Got {raw!r:.80}.")
    users: list[tuple[str, User]] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}, users[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be an object. Got {type(entry).__name__} instead.")
        unknown = set(entry) - {"name", "institution", "token", "token_sha256"}
        if unknown:
            raise ConfigError(f"{at} has unknown field(s) {sorted(unknown)}; known: name, institution, token, "
                              f"token_sha256.")
        name = entry.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ConfigError(f"{at}: field 'name' must be a unique non-empty string. Got {name!r} instead.")
        names.add(name)
        institution = entry.get("institution")
        if institution is not None:
            try:
                check_name(institution, what="institution")
            except MessageError as exc:
                raise ConfigError(f"{at}: field 'institution': {exc}") from None
        token, digest = entry.get("token"), entry.get("token_sha256")
        if (token is None) == (digest is None):
            raise ConfigError(f"{at} must have exactly one of 'token' and 'token_sha256'.")
        if token is not None:
            if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"{at}: field 'token' must be a string of at least {MIN_TOKEN_LENGTH} characters.")
            digest = token_digest(token)
        elif not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{at}: field 'token_sha256' must be 64 lower-case hex digits.")
        users.append((digest, User(name, institution)))
    return users
