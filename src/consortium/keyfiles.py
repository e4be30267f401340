"""Private key files: written 0600, read only when nobody else can read them.

A private key that a group or other users can read is as good as leaked, so
every key consortium reads (an institution's node-authentication key, the
coordinator's TLS and bundle-signing keys) goes through
:func:`read_private_key_file`, which refuses group/other permissions with a
message that says how to fix them (``chmod 600 PATH``), the way OpenSSH
refuses "UNPROTECTED PRIVATE KEY FILE". Keys are created with
:func:`write_private_key_file`, which never lets the file exist with a looser
mode, not even for an instant.

Neither function logs key material; messages name only paths and modes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from consortium.errors import ConfigError

__all__ = ["check_private_key_file", "read_private_key_file", "write_private_key_file"]

PRIVATE_MODE = 0o600
"""Owner read/write, nothing for group and others."""


def check_private_key_file(path: str | Path, *, what: str = "private key") -> Path:
    """Check that ``path`` is a regular file only its owner can read or write.

    Parameters
    ----------
    path : str or Path
        The key file.
    what : str
        What the key is, for messages (``"node authentication key of bank_a"``).

    Returns
    -------
    Path
        The absolute path.

    Raises
    ------
    ConfigError
        If the file is missing, not a regular file, or readable/writable by
        group or others; the message gives the mode found and the fix.
    """
    key_path = Path(path).expanduser().resolve()
    try:
        info = key_path.stat()
    except FileNotFoundError:
        raise ConfigError(f"The {what} file {key_path} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"Cannot read the {what} file {key_path}: {exc.strerror}.") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"The {what} path {key_path} must be a regular file.")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"The file {key_path} ({what}) must be readable by its owner only (mode 0600). "
            f"Got mode {mode:04o} instead. Run `chmod 600 {key_path}`; "
            "if others could read it, treat the key as leaked and make a new one."
        )
    return key_path


def read_private_key_file(path: str | Path, *, what: str = "private key") -> bytes:
    """Return the bytes of a private key file after :func:`check_private_key_file`.

    Raises
    ------
    ConfigError
        As :func:`check_private_key_file`.
    """
    key_path = check_private_key_file(path, what=what)
    try:
        return key_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read the {what} file {key_path}: {exc.strerror}.") from None


def write_private_key_file(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` with mode 0600 from the first byte.

    Parameters
    ----------
    path : str or Path
        Destination; its directory is created if missing.
    data : bytes
        The key material.
    overwrite : bool
        Replace an existing file (else :class:`ConfigError`).

    Returns
    -------
    Path
        The absolute path written.
    """
    key_path = Path(path).expanduser().resolve()
    if key_path.exists() and not overwrite:
        raise ConfigError(f"{key_path} already exists; pass overwrite=True to replace it.")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_path.with_name(f".{key_path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)  # the umask may have narrowed the mode given to os.open
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, key_path)
    return key_path
