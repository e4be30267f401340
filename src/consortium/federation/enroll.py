"""Node enrolment: only institutions whose public key the coordinator registered may join.

Flower 1.42's SuperNode authentication works with one EC key pair (NIST curve,
OpenSSH format) per institution:

1. the institution runs ``consortium enroll bank_a --out keys/``
   (:func:`generate_node_key`): ``keys/bank_a.key`` (private, mode 0600, never
   leaves the institution) and ``keys/bank_a.pub`` (one ``ecdsa-sha2-nistp384``
   line), and sends the ``.pub`` file and its fingerprint to the coordinator's
   operator over a channel where the fingerprint can be confirmed;
2. the operator drops ``bank_a.pub`` into the coordinator's enrolment directory
   (:func:`load_enrolled_keys` reads ``<institution>.pub`` files);
3. ``consortium coordinator --enrolled DIR`` starts the SuperLink with
   ``--enable-supernode-auth`` and registers every key through Flower's
   Control API (:func:`register_nodes`, i.e. ``flwr supernode register``);
4. the institution's SuperNode signs each request with its private key
   (``flower-supernode --auth-supernode-private-key``). A key the SuperLink
   does not know is refused at the first request; :func:`revoke_node` removes
   a registered key (``flwr supernode unregister``), after which the node's
   next request is refused.

Refusals are explained on both sides: :func:`refusal_on_node` turns the
SuperNode's exit into a message naming the key's fingerprint, and
:class:`RefusalWatcher` reads the SuperLink's log and logs one line per
refused key on the coordinator.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from consortium.errors import ConfigError, FederationError, param_error
from consortium.keyfiles import read_private_key_file, write_private_key_file

logger = logging.getLogger(__name__)

PUBLIC_SUFFIX = ".pub"
PRIVATE_SUFFIX = ".key"
_INSTITUTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@dataclass(frozen=True)
class NodeKey:
    """An institution's enrolment key pair as written by :func:`generate_node_key`.

    Attributes
    ----------
    institution : str
        Whose key it is.
    private_key : Path
        OpenSSH private key, mode 0600; stays with the institution.
    public_key : Path
        One-line OpenSSH public key; the coordinator's operator registers it.
    fingerprint : str
        ``SHA256:<base64>`` of the public key, as ``ssh-keygen -lf`` prints it;
        confirm it out of band before registering.
    """

    institution: str
    private_key: Path
    public_key: Path
    fingerprint: str


def _check_institution(institution: object, owner: str) -> str:
    if not isinstance(institution, str) or not _INSTITUTION.match(institution):
        raise param_error(
            "institution", owner,
            "a name of letters, digits, '_', '.', '-' (starting with a letter or digit)",
            institution,
        )
    return institution


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` fingerprint of a public key (same as ``ssh-keygen -lf``)."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = base64.b64decode(blob.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def generate_node_key(out_dir: str | Path, institution: str, *, overwrite: bool = False) -> NodeKey:
    """Create an institution's enrolment key pair (ECDSA P-384, OpenSSH format).

    Parameters
    ----------
    out_dir : str or Path
        Directory for ``<institution>.key`` (mode 0600) and ``<institution>.pub``.
    institution : str
        The institution's name; it also names the files.
    overwrite : bool
        Replace existing files (the old key then no longer works once the
        operator registers the new one and revokes the old).

    Returns
    -------
    NodeKey
        Paths and fingerprint.
    """
    name = _check_institution(institution, "generate_node_key")
    directory = Path(out_dir).expanduser().resolve()
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists():
                raise ConfigError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_private_key_file(private_path, private_pem, overwrite=overwrite)
    public_path.write_bytes(public_line + f" {name}\n".encode())
    public_path.chmod(0o644)
    return NodeKey(
        institution=name,
        private_key=private_path,
        public_key=public_path,
        fingerprint=fingerprint(key.public_key()),
    )


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """Read and check one ``.pub`` file (OpenSSH, EC on a NIST curve).

    Raises
    ------
    ConfigError
        Missing file, not an OpenSSH public key, or not an EC key on P-256/384/521.
    """
    key_path = Path(path).expanduser().resolve()
    try:
        data = key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read the public key file {key_path}: {exc.strerror}.") from None
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"The public key file {key_path} must hold one OpenSSH public key line "
            f"('ecdsa-sha2-nistp384 AAAA... name'). Got an unreadable key instead ({exc})."
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise ConfigError(
            f"The public key in {key_path} must be an EC key on a NIST curve (P-256/384/521; "
            f"make one with `consortium enroll`). Got {type(key).__name__} instead."
        )
    return key


def load_node_private_key(path: str | Path, *, institution: str = "") -> Path:
    """Check an institution's private key file (mode 0600, EC OpenSSH key); return its path.

    Flower's SuperNode reads the file itself; this check runs first so that a
    world-readable or malformed key is refused with a clear message.
    """
    what = f"node authentication key{f' of {institution}' if institution else ''}"
    data = read_private_key_file(path, what=what)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"The {what} file {Path(path).resolve()} must be an unencrypted OpenSSH EC private key "
            "(made by `consortium enroll`). It could not be parsed."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST_CURVES):
        raise ConfigError(
            f"The {what} file {Path(path).resolve()} must hold an EC key on a NIST curve. "
            f"Got {type(key).__name__} instead."
        )
    return Path(path).expanduser().resolve()


def node_key_fingerprint(private_key_path: str | Path) -> str:
    """Fingerprint of the public half of a private key file (for messages)."""
    data = read_private_key_file(private_key_path, what="node authentication key")
    key = serialization.load_ssh_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return fingerprint(key.public_key())


def load_enrolled_keys(directory: str | Path) -> dict[str, Path]:
    """The enrolled institutions: ``<institution>.pub`` files in ``directory``.

    Raises
    ------
    ConfigError
        Missing directory, no ``.pub`` file, an invalid key, a bad file name, or
        one key enrolled under two names.
    """
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError(f"The enrolment directory {root} does not exist.")
    keys: dict[str, Path] = {}
    seen: dict[str, str] = {}
    for path in sorted(root.glob(f"*{PUBLIC_SUFFIX}")):
        name = path.name[: -len(PUBLIC_SUFFIX)]
        _check_institution(name, f"load_enrolled_keys ({path})")
        fp = fingerprint(load_public_key(path))
        if fp in seen:
            raise ConfigError(
                f"The same public key ({fp}) is enrolled as both '{seen[fp]}' and '{name}' in {root}; "
                "every institution needs its own key."
            )
        seen[fp] = name
        keys[name] = path
    if not keys:
        raise ConfigError(
            f"The enrolment directory {root} holds no '<institution>.pub' file; "
            "add the public keys made with `consortium enroll`."
        )
    return keys


def operator_instructions(key: NodeKey) -> str:
    """What the institution sends and what the coordinator's operator does with it."""
    return (
        f"Private key: {key.private_key}  (mode 0600; keep it at {key.institution}, never send it)\n"
        f"Public key:  {key.public_key}\n"
        f"Fingerprint: {key.fingerprint}\n\n"
        "Send the public key file to the coordinator's operator and confirm the fingerprint with them\n"
        "by a second channel (phone). The operator enrols it by copying it into the enrolment directory:\n"
        f"    cp {key.public_key.name} ENROLLED_DIR/{key.institution}.pub\n"
        "    consortium coordinator --certs CERTS --enrolled ENROLLED_DIR ...\n"
        "Then run the node with:\n"
        f"    consortium node --institution {key.institution} --key {key.private_key} --ca-cert ca.crt ...\n"
    )


# --------------------------------------------------------------------------------------
# Coordinator side: register / revoke through Flower's Control API
# --------------------------------------------------------------------------------------


def register_nodes(coordinator: object, enrolled: Mapping[str, str | Path]) -> dict[str, int]:
    """Register each institution's public key with a running SuperLink.

    Parameters
    ----------
    coordinator : CoordinatorProcess
        Started with ``node_auth=True``.
    enrolled : mapping
        Institution name -> ``.pub`` file (see :func:`load_enrolled_keys`).

    Returns
    -------
    dict
        Institution -> Flower node id.
    """
    from consortium.federation import deploy  # noqa: PLC0415  (deploy imports this module)

    if not isinstance(coordinator, deploy.CoordinatorProcess):
        raise param_error("coordinator", "register_nodes", "a CoordinatorProcess", coordinator)
    ids: dict[str, int] = {}
    with deploy._cli_home(coordinator, ca_cert=None, insecure=False, work_dir=None) as cli:
        for institution, pub in enrolled.items():
            load_public_key(pub)
            answer = deploy._flwr_json(
                cli,
                [str(deploy.flower_executable("flwr")), "supernode", "register", str(Path(pub).resolve()),
                 deploy.CONNECTION_NAME, "--name", institution, "--format", "json"],
                what=f"register the public key of '{institution}'",
                deadline=_deadline(),
            )
            ids[institution] = int(str(answer["node-id"]))
            logger.info("Enrolled '%s' as node %s (%s)", institution, ids[institution],
                        fingerprint(load_public_key(pub)))
    return ids


def revoke_node(coordinator: object, node_id: int, *, institution: str = "") -> None:
    """Unregister a node's key; its next request to the coordinator is refused."""
    from consortium.federation import deploy  # noqa: PLC0415

    if not isinstance(coordinator, deploy.CoordinatorProcess):
        raise param_error("coordinator", "revoke_node", "a CoordinatorProcess", coordinator)
    with deploy._cli_home(coordinator, ca_cert=None, insecure=False, work_dir=None) as cli:
        deploy._flwr_json(
            cli,
            [str(deploy.flower_executable("flwr")), "supernode", "unregister", str(int(node_id)),
             deploy.CONNECTION_NAME, "--format", "json"],
            what=f"revoke node {node_id}",
            deadline=_deadline(),
        )
    logger.warning("Revoked node %s%s: it can no longer join", node_id,
                   f" ('{institution}')" if institution else "")


def _deadline() -> float:
    import time  # noqa: PLC0415

    return time.monotonic() + 60.0


# --------------------------------------------------------------------------------------
# Explaining refusals
# --------------------------------------------------------------------------------------

_NODE_REFUSED = ("Failed to activate SuperNode", "code: 2004")
_ACTIVATION_REFUSED = re.compile(
    r"\[/v1/fleet/activate-node\]\[ApiError:2004\].*?(-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----)",
    re.DOTALL,
)
_REQUEST_REFUSED = re.compile(r'"POST (/v1/fleet/(?!deactivate-node)[a-z-]+) HTTP/[0-9.]+" 401')


def node_was_refused(log_text: str) -> bool:
    """Whether a SuperNode's log shows the coordinator refused its key at activation."""
    return any(marker in log_text for marker in _NODE_REFUSED)


def refusal_on_node(institution: str, key_path: Path | None, log_tail: str) -> FederationError:
    """The node-side error for a refused (unenrolled or revoked) key."""
    fp = ""
    if key_path is not None:
        try:
            fp = f" (key {node_key_fingerprint(key_path)})"
        except (ConfigError, ValueError):
            fp = ""
    return FederationError(
        f"The coordinator refused institution '{institution}'{fp}: its public key is not enrolled "
        "or was revoked. Send the .pub file made by `consortium enroll` to the coordinator's operator "
        f"and ask them to enrol it. Last lines of the SuperNode log:\n{log_tail}"
    )


def refusals_in_superlink_log(log_text: str) -> list[str]:
    """One readable line per node request the SuperLink refused, in log order.

    The SuperLink logs a refused activation with the key in PEM (turned into
    its fingerprint here) and a refused later request (a revoked key) as an
    HTTP 401 on a Fleet API path.
    """
    text = log_text.replace("\\n", "\n")
    found: list[tuple[int, str]] = []
    for match in _ACTIVATION_REFUSED.finditer(text):
        try:
            key = serialization.load_pem_public_key(match.group(1).encode())
            fp = fingerprint(key) if isinstance(key, ec.EllipticCurvePublicKey) else "unknown key"
        except ValueError:
            fp = "unreadable key"
        found.append((match.start(), f"Refused a node: public key {fp} is not enrolled (or was revoked)."))
    for match in _REQUEST_REFUSED.finditer(text):
        found.append((
            match.start(),
            f"Refused a node request ({match.group(1)}): its key is not or no longer enrolled "
            "(revoked while connected).",
        ))
    out = [line for _, line in sorted(found)]
    return out


class RefusalWatcher:
    """Log, on the coordinator, each node refusal the SuperLink records.

    Reads the SuperLink's log every ``interval`` seconds in a daemon thread and
    logs each new refusal once at WARNING (``consortium.federation.enroll``).
    Use as a context manager around the coordinator's lifetime.
    """

    def __init__(self, coordinator: object, *, interval: float = 1.0) -> None:
        import threading  # noqa: PLC0415

        self._coordinator = coordinator
        self._interval = interval
        self._stop = threading.Event()
        self._seen = 0
        self._thread = threading.Thread(target=self._loop, name="refusal-watcher", daemon=True)
        self.refusals: list[str] = []

    def poll(self) -> list[str]:
        """Check the log once; return (and log) the refusals not seen before."""
        found = refusals_in_superlink_log(self._coordinator.log_text())  # type: ignore[attr-defined]
        new = found[self._seen :]
        self._seen = len(found)
        for line in new:
            logger.warning("%s", line)
        self.refusals.extend(new)
        return new

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def __enter__(self) -> RefusalWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.poll()
