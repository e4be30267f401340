"""Ed25519 keys that sign model bundles: generate, load, fingerprint.

The coordinator signs every model bundle with one Ed25519 private key; edge agents
and the registry verify with the matching public key.  The private key is the
consortium's root of trust for models, so this module enforces the key-file rules
of the security requirements:

* private keys are written with mode ``0600`` (created that way, never widened)
  and :func:`load_private_key` refuses files that the group or others can read
  through :func:`consortium.keyfiles.check_private_key_file`, the one check every
  private key goes through, whose message names the file, its mode and the
  ``chmod 600`` that fixes it;
* nothing here logs or puts key material into an error message; keys are referred
  to by :func:`key_fingerprint`, a short hash of the public key.

Key files are PEM: PKCS#8 (unencrypted) for the private key and
SubjectPublicKeyInfo for the public key, written next to it as ``<path>.pub``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from consortium.errors import ConfigError, ConsortiumError, param_error
from consortium.keyfiles import check_private_key_file

logger = logging.getLogger(__name__)

__all__ = [
    "SigningKeyError",
    "generate_signing_key",
    "key_fingerprint",
    "load_private_key",
    "load_public_key",
    "public_key_path",
]

_PEM_PREFIX = b"-----BEGIN"
_MAX_KEY_FILE_BYTES = 64 * 1024


class SigningKeyError(ConsortiumError):
    """A signing key file is missing, unreadable, too widely readable or not an Ed25519 key."""


def public_key_path(private_key_path: Path | str) -> Path:
    """Where :func:`generate_signing_key` writes the public key: ``<path>.pub``."""
    path = Path(private_key_path)
    return path.with_name(path.name + ".pub")


def key_fingerprint(public_key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """Short, stable id of a key pair: first 16 hex digits of SHA-256 of the raw public key.

    Safe to log and to store; used in bundle signatures so that a bundle signed by
    another key is reported as "wrong key" rather than as a bad signature.
    """
    if isinstance(public_key, Ed25519PrivateKey):
        public_key = public_key.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise param_error("public_key", "key_fingerprint", "an Ed25519 key", type(public_key).__name__)
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(path: Path | str, *, overwrite: bool = False) -> Path:
    """Create a new Ed25519 signing key pair on disk.

    Parameters
    ----------
    path : Path or str
        Where to write the private key (PEM, mode ``0600``).  The public key goes
        to ``<path>.pub`` (mode ``0644``).  The parent directory must exist.
    overwrite : bool, default False
        Replace existing files.  Without it an existing key is never touched:
        losing the signing key means every agent must be re-provisioned.

    Returns
    -------
    Path
        The private key's path.

    Raises
    ------
    SigningKeyError
        If a key file already exists (and ``overwrite`` is False) or the files
        cannot be written.
    """
    key_path = Path(path)
    pub_path = public_key_path(key_path)
    if not key_path.parent.is_dir():
        raise SigningKeyError(
            f"Cannot write the signing key {str(key_path)!r}: directory "
            f"{str(key_path.parent)!r} does not exist."
        )
    if not overwrite:
        for existing in (key_path, pub_path):
            if existing.exists():
                raise SigningKeyError(
                    f"Refusing to overwrite the existing key file {str(existing)!r}; "
                    "pass overwrite=True (CLI: --overwrite) to replace it."
                )
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _write_atomically(key_path, private_pem, mode=0o600)
        _write_atomically(pub_path, public_pem, mode=0o644)
    except OSError as exc:
        raise SigningKeyError(f"Cannot write the signing key {str(key_path)!r}: {exc.strerror}.") from exc
    logger.info("Generated signing key %s (fingerprint %s)", key_path, key_fingerprint(private_key))
    return key_path


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to a temporary file created with ``mode``, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened beyond mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SigningKeyError(f"The {what} file {str(path)!r} does not exist.") from None
    except OSError as exc:
        raise SigningKeyError(f"Cannot read the {what} file {str(path)!r}: {exc.strerror}.") from exc
    if not stat.S_ISREG(info.st_mode):
        raise SigningKeyError(f"The {what} file {str(path)!r} is not a regular file.")
    if info.st_size > _MAX_KEY_FILE_BYTES:
        raise SigningKeyError(
            f"The {what} file {str(path)!r} must be a PEM key of at most "
            f"{_MAX_KEY_FILE_BYTES} bytes. Got {info.st_size} bytes instead."
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"Cannot read the {what} file {str(path)!r}: {exc.strerror}.") from exc


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Load the bundle-signing private key, refusing files others can read.

    Parameters
    ----------
    path : Path or str
        PEM (PKCS#8, unencrypted) Ed25519 private key, as written by
        :func:`generate_signing_key`.

    Raises
    ------
    SigningKeyError
        If the file is missing, readable or writable by group or others (the
        message gives its mode and the fix, ``chmod 600``), not PEM, or not an
        Ed25519 key.  The message never contains key material.
    """
    try:
        key_path = check_private_key_file(path, what="signing key")
    except ConfigError as exc:
        # Same rule and message as every other private key consortium reads; the
        # registry and CLI callers handle SigningKeyError, so keep that type.
        raise SigningKeyError(str(exc)) from None
    data = _read_key_file(key_path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never chain the parser's exception: it could quote the file's bytes.
        raise SigningKeyError(
            f"The signing key file {str(key_path)!r} must hold an unencrypted PEM (PKCS#8) "
            "Ed25519 private key. Got unreadable or encrypted key data instead."
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"The signing key file {str(key_path)!r} must hold an Ed25519 private key. "
            f"Got a {type(key).__name__.lstrip('_')} instead."
        )
    return key


def load_public_key(path_or_pem: Path | str | bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file or from PEM text.

    Parameters
    ----------
    path_or_pem : Path, str or bytes
        ``bytes`` or a ``str`` starting with ``-----BEGIN`` are PEM data
        (SubjectPublicKeyInfo); any other ``str`` or a ``Path`` names a file.

    Raises
    ------
    SigningKeyError
        If the file is missing or the data is not an Ed25519 public key.
    """
    if isinstance(path_or_pem, bytes):
        data, source = path_or_pem, "The public key data"
    elif isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith(_PEM_PREFIX.decode()):
        data, source = path_or_pem.encode("ascii", errors="replace"), "The public key data"
    elif isinstance(path_or_pem, str | os.PathLike):
        key_path = Path(path_or_pem)
        data, source = _read_key_file(key_path, "public key"), f"The public key file {str(key_path)!r}"
    else:
        raise param_error(
            "path_or_pem", "load_public_key", "a path or PEM data (str or bytes)",
            type(path_or_pem).__name__,
        )
    try:
        key = serialization.load_pem_public_key(data.strip() + b"\n")
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningKeyError(
            f"{source} must be a PEM (SubjectPublicKeyInfo) Ed25519 public key. "
            "Got unreadable key data instead."
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(
            f"{source} must be an Ed25519 public key. Got a {type(key).__name__.lstrip('_')} instead."
        )
    return key
