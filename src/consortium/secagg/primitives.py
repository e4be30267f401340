"""Pure cryptographic building blocks of secure aggregation (no protocol state).

* X25519 key pairs and Diffie-Hellman agreement;
* HKDF-SHA256 key derivation with labelled ``info`` strings, so a key derived
  for one purpose (pairwise mask, share encryption) is never reused for another;
* AES-256-GCM authenticated encryption of the Shamir shares two neighbours
  exchange through the coordinator (the associated data binds sender, receiver
  and round, so the coordinator cannot replay or re-route a share);
* an AES-CTR pseudo-random generator that expands a >= 128-bit seed into a
  vector of ``uint32`` masks, vectorised through ``np.frombuffer``;
* Shamir secret sharing over the Mersenne prime field ``p = 2**521 - 1`` (large
  enough for 32-byte secrets);
* a hash commitment to a secret, used to detect garbage shares.

Every function here is deterministic given its inputs (apart from key and
coefficient generation, which use the operating system's CSPRNG) and has
known-answer tests in ``tests/test_secagg_primitives.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from consortium.errors import param_error
from consortium.secagg.errors import CryptoError

KEY_BYTES = 32
"""Length of X25519 private/public keys, derived keys and self-mask seeds."""
MIN_SEED_BYTES = 16
"""A PRG seed carries at least 128 bits."""
NONCE_BYTES = 12
TAG_BYTES = 16
HKDF_LABEL_PREFIX = b"consortium/secagg/v1/"
SHAMIR_PRIME = 2**521 - 1
"""Mersenne prime; field elements are sent as 66-byte big-endian integers."""
SHARE_BYTES = 66
MAX_MODULUS_BITS = 32


# --------------------------------------------------------------------------- X25519


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings (the private part is never printed)."""

    private: bytes = field(repr=False)
    public: bytes


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's CSPRNG."""
    sk = X25519PrivateKey.generate()
    return KeyPair(private=sk.private_bytes_raw(), public=sk.public_key().public_bytes_raw())


def public_key_of(private: bytes) -> bytes:
    """The raw public key that belongs to a raw X25519 private key."""
    _check_len(private, KEY_BYTES, "private", "public_key_of")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 Diffie-Hellman: the 32-byte shared secret of ``private`` and ``peer_public``.

    Raises
    ------
    CryptoError
        If the peer's public key is a low-order point (the agreement would be
        all zeros and therefore known to everybody).
    """
    _check_len(private, KEY_BYTES, "private", "agree")
    _check_len(peer_public, KEY_BYTES, "peer_public", "agree")
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise CryptoError(
            f"X25519 agreement failed: the peer public key {peer_public.hex()[:16]}... is a "
            "low-order point. The peer must send a freshly generated public key."
        ) from exc


def agree_many(private: bytes, peer_publics: Sequence[bytes]) -> list[bytes]:
    """:func:`agree` with one private key and many peers (the key is loaded once)."""
    _check_len(private, KEY_BYTES, "private", "agree_many")
    sk = X25519PrivateKey.from_private_bytes(private)
    out = []
    for pk in peer_publics:
        _check_len(pk, KEY_BYTES, "peer_public", "agree_many")
        try:
            out.append(sk.exchange(X25519PublicKey.from_public_bytes(pk)))
        except ValueError as exc:
            raise CryptoError(
                f"X25519 agreement failed: the peer public key {pk.hex()[:16]}... is a "
                "low-order point. The peer must send a freshly generated public key."
            ) from exc
    return out


# --------------------------------------------------------------------------- HKDF


_HASH_BYTES = 32
_ZERO_SALT = bytes(_HASH_BYTES)


def hkdf_sha256(secret: bytes, *, info: bytes, length: int = KEY_BYTES, salt: bytes | None = None) -> bytes:
    """Plain HKDF-SHA256 (RFC 5869); ``salt=None`` means a zero salt of hash length.

    Written with :func:`hmac.digest` (OpenSSL's one-shot HMAC): extract, then as
    many expand blocks as ``length`` needs. Checked against the RFC 5869 test
    vectors; about 3x cheaper than building a ``cryptography`` HKDF object per
    key, which matters with ``2 k`` derived keys per participant and round.
    """
    if not isinstance(length, int) or not 0 < length <= 255 * _HASH_BYTES:
        raise param_error("length", "hkdf_sha256", f"an int in [1, {255 * _HASH_BYTES}]", length)
    prk = hmac.digest(salt or _ZERO_SALT, secret, "sha256")  # an empty salt is the zero salt (HMAC pads keys)
    block, okm = b"", b""
    for counter in range(1, -(-length // _HASH_BYTES) + 1):
        block = hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        okm += block
    return okm[:length]


def derive_key(secret: bytes, *, label: str, context: bytes = b"", length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` with ``info = prefix + label + 0x00 + context``.

    Parameters
    ----------
    secret : bytes
        Input key material, e.g. an X25519 shared secret.
    label : str
        Purpose of the key (``"pairwise-mask"``, ``"share-encryption"``); keys for
        different purposes are independent even when derived from the same secret.
    context : bytes
        Binds the key to a round and a pair of participants.
    length : int
        Output length in bytes.
    """
    if not label or "\x00" in label:
        raise param_error("label", "derive_key", "a non-empty string without NUL", label)
    return hkdf_sha256(secret, info=HKDF_LABEL_PREFIX + label.encode() + b"\x00" + context, length=length)


def commitment(secret: bytes, *, context: bytes) -> bytes:
    """SHA-256 commitment ``H(prefix || "commit" || context || secret)`` to a high-entropy secret.

    Publishing it reveals nothing useful about a 256-bit random secret, and it
    lets the coordinator check a Shamir reconstruction without trusting shares.
    """
    return hashlib.sha256(HKDF_LABEL_PREFIX + b"commit\x00" + context + b"\x00" + secret).digest()


# --------------------------------------------------------------------------- AES-GCM


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AES-256-GCM encryption; returns ``nonce (12 bytes) || ciphertext || tag``."""
    _check_len(key, KEY_BYTES, "key", "encrypt")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises
    ------
    CryptoError
        If the ciphertext was modified, truncated, or encrypted for different
        associated data (another sender, receiver or round).
    """
    _check_len(key, KEY_BYTES, "key", "decrypt")
    if not isinstance(ciphertext, bytes | bytearray) or len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(
            f"Ciphertext too short: {_describe(ciphertext)}, at least {NONCE_BYTES + TAG_BYTES} bytes expected."
        )
    nonce, body = bytes(ciphertext[:NONCE_BYTES]), bytes(ciphertext[NONCE_BYTES:])
    try:
        return AESGCM(key).decrypt(nonce, body, associated_data)
    except InvalidTag as exc:
        raise CryptoError(
            "Share ciphertext failed authentication: it was altered, or it is not addressed "
            "to this receiver, from this sender, in this round."
        ) from exc


# --------------------------------------------------------------------------- PRG


def check_modulus(modulus: int) -> int:
    """Return ``b`` for a modulus ``2**b`` with ``1 <= b <= 32``; raise ConfigError otherwise."""
    if not isinstance(modulus, int) or modulus < 2 or modulus > 2**MAX_MODULUS_BITS or modulus & (modulus - 1):
        raise param_error("modulus", "prg_uint32", "a power of two in [2, 2**32]", modulus)
    return modulus.bit_length() - 1


def prg_uint32(seed: bytes, n: int, *, modulus: int = 2**MAX_MODULUS_BITS) -> np.ndarray:
    """Expand ``seed`` into ``n`` pseudo-random integers uniform in ``[0, modulus)``.

    The keystream of AES-CTR (key = the seed if it is 16, 24 or 32 bytes long,
    else SHA-256 of the seed; initial counter block = 0) is read as
    little-endian ``uint32`` words. Moduli are restricted to powers of two, so
    masking the low ``b`` bits of a uniform word is exactly uniform (no bias).

    Parameters
    ----------
    seed : bytes
        At least 16 bytes of secret key material; one seed per purpose and round.
    n : int
        Number of integers.
    modulus : int
        A power of two ``2**b`` with ``1 <= b <= 32``.

    Returns
    -------
    numpy.ndarray
        ``uint32`` array of shape ``(n,)``.
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) < MIN_SEED_BYTES:
        raise param_error("seed", "prg_uint32", f"bytes of length >= {MIN_SEED_BYTES}", _describe(seed))
    if not isinstance(n, int | np.integer) or n < 0:
        raise param_error("n", "prg_uint32", "an int >= 0", n)
    bits = check_modulus(modulus)
    key = bytes(seed) if len(seed) in (16, 24, 32) else hashlib.sha256(seed).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    nbytes = 4 * int(n)
    buffer = bytearray(nbytes + 15)  # update_into needs block_size - 1 spare bytes
    encryptor.update_into(bytes(nbytes), buffer)
    out = np.frombuffer(buffer, dtype="<u4", count=int(n))  # writable view, no copy
    if bits < MAX_MODULUS_BITS:
        np.bitwise_and(out, np.uint32(modulus - 1), out=out)
    return out


class MaskExpander:
    """Expands many seeds to the same length ``n`` and adds them into an accumulator.

    Equivalent to ``acc += sign * prg_uint32(seed, n)`` (mod ``2**32``) but reuses
    its buffers, which avoids fresh page-faulting allocations for every one of
    the ``k + 1`` masks of a client (a 3x speed-up for large vectors). Reducing
    the accumulator modulo ``2**b`` once at the end gives the same result as
    masking each expansion, because ``2**b`` divides ``2**32``.

    Each expansion is one AES-CTR ``update_into`` call over a zero buffer of the
    needed size, read in place as ``uint32`` through ``np.frombuffer``, plus one
    ``np.add``/``np.subtract`` pass: the PRG costs two passes over ``4 n`` bytes.

    Parameters
    ----------
    n : int
        Length of every expansion.
    """

    def __init__(self, n: int) -> None:
        if not isinstance(n, int | np.integer) or n < 0:
            raise param_error("n", "MaskExpander", "an int >= 0", n)
        self.n = int(n)
        self._zeros = bytes(4 * self.n)
        self._buffer = bytearray(4 * self.n + 15)
        self._view = np.frombuffer(self._buffer, dtype="<u4", count=self.n)

    def add_into(self, acc: np.ndarray, seed: bytes, *, subtract: bool = False, base: np.ndarray | None = None) -> None:
        """``acc += PRG(seed)`` (or ``-=``), in place, modulo ``2**32``.

        With ``base``, ``acc = base + PRG(seed)`` (or ``-``) instead: the first
        mask of a vector is added while copying it, saving one pass.
        """
        if not isinstance(seed, bytes | bytearray) or len(seed) < MIN_SEED_BYTES:
            raise param_error("seed", "MaskExpander.add_into", f"bytes of length >= {MIN_SEED_BYTES}", _describe(seed))
        if acc.dtype != np.uint32 or acc.shape != (self.n,):
            raise param_error("acc", "MaskExpander.add_into", f"a uint32 array of shape ({self.n},)", acc.shape)
        if base is None:
            base = acc
        elif base.dtype != np.uint32 or base.shape != (self.n,):
            raise param_error("base", "MaskExpander.add_into", f"a uint32 array of shape ({self.n},)", base.shape)
        key = bytes(seed) if len(seed) in (16, 24, 32) else hashlib.sha256(seed).digest()
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(self._zeros, self._buffer)
        if subtract:
            np.subtract(base, self._view, out=acc)
        else:
            np.add(base, self._view, out=acc)


# --------------------------------------------------------------------------- Shamir


@dataclass(frozen=True)
class ShamirShare:
    """One point ``(x, f(x))`` of a Shamir polynomial over ``GF(2**521 - 1)``."""

    x: int
    y: int = field(repr=False)


def shamir_evaluate(coefficients: Sequence[int], xs: Iterable[int]) -> list[ShamirShare]:
    """Evaluate the polynomial ``sum(c_i x**i)`` mod p at each ``x`` (Horner's rule).

    ``coefficients[0]`` is the secret. Exposed for known-answer tests.
    """
    shares = []
    for x in xs:
        if not 0 < x < SHAMIR_PRIME:
            raise param_error("xs", "shamir_evaluate", "integers in (0, p)", x)
        acc = 0
        for c in reversed(coefficients):
            acc = (acc * x + c) % SHAMIR_PRIME
        shares.append(ShamirShare(x=int(x), y=acc))
    return shares


def shamir_split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[ShamirShare]:
    """Split ``secret`` into ``len(xs)`` shares; any ``threshold`` of them reconstruct it.

    Parameters
    ----------
    secret : bytes
        At most 65 bytes (the field holds 521 bits).
    threshold : int
        Number of shares needed; fewer reveal nothing about the secret.
    xs : sequence of int
        Distinct non-zero evaluation points, one per share holder.
    """
    if not isinstance(secret, bytes | bytearray) or not 0 < len(secret) < SHARE_BYTES:
        raise param_error("secret", "shamir_split", "1 to 65 bytes", _describe(secret))
    if len(set(xs)) != len(xs):
        raise param_error("xs", "shamir_split", "distinct evaluation points", list(xs))
    if not isinstance(threshold, int) or not 1 <= threshold <= len(xs):
        raise param_error("threshold", "shamir_split", f"an int in [1, {len(xs)}]", threshold)
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    return shamir_evaluate(coefficients, xs)


def shamir_reconstruct(shares: Sequence[ShamirShare], *, secret_len: int) -> bytes:
    """Lagrange interpolation at 0 of the given shares, as a ``secret_len``-byte string.

    Exactly the given shares are used (pass ``threshold`` of them).

    Raises
    ------
    CryptoError
        If the x coordinates repeat, or the interpolated value does not fit in
        ``secret_len`` bytes (a sure sign of a garbage share).
    """
    xs = [s.x for s in shares]
    if not shares or len(set(xs)) != len(xs):
        raise CryptoError(f"Shamir reconstruction needs distinct share points; got x = {xs}.")
    p = SHAMIR_PRIME
    secret = 0
    for i, si in enumerate(shares):
        num, den = 1, 1
        for j, sj in enumerate(shares):
            if i != j:
                num = num * sj.x % p
                den = den * (sj.x - si.x) % p
        secret = (secret + si.y * num * pow(den, -1, p)) % p
    if secret >= 1 << (8 * secret_len):
        raise CryptoError(
            f"Shamir reconstruction gave a value wider than {secret_len} bytes: at least one share is corrupt."
        )
    return secret.to_bytes(secret_len, "big")


def share_to_bytes(share: ShamirShare) -> bytes:
    """The ``y`` value of a share as 66 big-endian bytes (``x`` is implied by the holder)."""
    return share.y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(x: int, data: bytes) -> ShamirShare:
    """Parse a share value written by :func:`share_to_bytes`, checking length and range."""
    if not isinstance(data, bytes | bytearray) or len(data) != SHARE_BYTES:
        raise CryptoError(f"A Shamir share must be {SHARE_BYTES} bytes; got {_describe(data)}.")
    y = int.from_bytes(data, "big")
    if y >= SHAMIR_PRIME:
        raise CryptoError("A Shamir share value is outside the field GF(2**521 - 1).")
    return ShamirShare(x=x, y=y)


# --------------------------------------------------------------------------- helpers


def _check_len(value: object, length: int, name: str, owner: str) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != length:
        raise param_error(name, owner, f"{length} bytes", _describe(value))


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    return type(value).__name__
