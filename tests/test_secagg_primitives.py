"""Known-answer and property tests of the pure cryptographic primitives."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest
from scipy import stats

from consortium.errors import ConfigError
from consortium.secagg import primitives as prim
from consortium.secagg.errors import CryptoError


def _words(hex_block: str) -> list[int]:
    """A 16-byte AES block as four little-endian uint32 words."""
    return list(np.frombuffer(bytes.fromhex(hex_block), dtype="<u4"))


# --------------------------------------------------------------------------- PRG


def test_prg_known_answer_aes128_zero_key() -> None:
    # AES-128(K=0) of counter blocks 0 and 2: the published GCM test-case-1 hash key H
    # and the test-case-2 ciphertext (NIST GCM spec, McGrew & Viega).
    out = prim.prg_uint32(bytes(16), 12)
    assert out.dtype == np.uint32
    assert list(out[:4]) == _words("66e94bd4ef8a2c3b884cfa59ca342b2e")
    assert list(out[8:12]) == _words("0388dace60b6a392f328c2b971b2fe78")


def test_prg_known_answer_aes256_zero_key() -> None:
    # AES-256(K=0) of counter blocks 0 and 2: GCM test case 13 H and test case 14 C.
    out = prim.prg_uint32(bytes(32), 12)
    assert list(out[:4]) == _words("dc95c078a2408989ad48a21492842087")
    assert list(out[8:12]) == _words("cea7403d4d606b6e074ec5d3baf39d18")


def test_prg_other_seed_lengths_hash_to_an_aes256_key() -> None:
    seed = bytes(range(20))
    assert np.array_equal(prim.prg_uint32(seed, 100), prim.prg_uint32(hashlib.sha256(seed).digest(), 100))


def test_prg_power_of_two_modulus_masks_low_bits() -> None:
    seed = bytes(range(32))
    full = prim.prg_uint32(seed, 1000)
    assert np.array_equal(prim.prg_uint32(seed, 1000, modulus=2**12), full & 0xFFF)
    assert prim.prg_uint32(seed, 0).shape == (0,)


def test_prg_is_deterministic_and_prefix_consistent() -> None:
    seed = b"k" * 16
    assert np.array_equal(prim.prg_uint32(seed, 50), prim.prg_uint32(seed, 500)[:50])
    assert not np.array_equal(prim.prg_uint32(seed, 50), prim.prg_uint32(b"j" * 16, 50))


@pytest.mark.parametrize("seed", [b"", b"short", bytes(15), "not-bytes"])
def test_prg_rejects_short_seed(seed: object) -> None:
    with pytest.raises(ConfigError, match="'seed' parameter of prg_uint32"):
        prim.prg_uint32(seed, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("modulus", [0, 1, 3, 1000, 2**33, 2.0])
def test_prg_rejects_non_power_of_two_modulus(modulus: object) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        prim.prg_uint32(bytes(16), 4, modulus=modulus)  # type: ignore[arg-type]


def test_mask_expander_adds_subtracts_and_copies_from_a_base() -> None:
    n, seed = 1001, bytes(range(32))
    mask = prim.prg_uint32(seed, n)
    base = np.arange(n, dtype=np.uint32)
    expander = prim.MaskExpander(n)
    out = np.empty(n, dtype=np.uint32)
    expander.add_into(out, seed, base=base)
    assert np.array_equal(out, base + mask)
    expander.add_into(out, seed, subtract=True)
    assert np.array_equal(out, base)
    expander.add_into(out, seed, subtract=True, base=base)
    assert np.array_equal(out, base - mask)
    assert np.array_equal(base, np.arange(n, dtype=np.uint32))  # the base is only read
    with pytest.raises(ConfigError, match="'base' parameter"):
        expander.add_into(out, seed, base=base[:-1])


def test_prg_output_bytes_are_uniform() -> None:
    out = prim.prg_uint32(bytes(range(32)), 64_000)
    counts = np.bincount(out.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-4


# --------------------------------------------------------------------------- X25519, HKDF, AEAD


def test_x25519_rfc7748_vectors() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    assert prim.public_key_of(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert prim.public_key_of(bob).hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert prim.agree(alice, prim.public_key_of(bob)).hex() == shared
    assert prim.agree(bob, prim.public_key_of(alice)).hex() == shared


def test_x25519_rejects_low_order_point() -> None:
    with pytest.raises(CryptoError, match="low-order"):
        prim.agree(prim.generate_keypair().private, bytes(32))


def test_keypair_repr_hides_private_key() -> None:
    kp = prim.generate_keypair()
    assert kp.private.hex() not in repr(kp)
    assert prim.public_key_of(kp.private) == kp.public


def test_hkdf_rfc5869_vectors() -> None:
    # Test case 1 and test case 3 (empty salt and info) of RFC 5869.
    ikm = bytes([0x0B]) * 22
    okm1 = prim.hkdf_sha256(ikm, info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), salt=bytes(range(13)), length=42)
    assert okm1.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
    okm3 = prim.hkdf_sha256(ikm, info=b"", length=42)
    assert okm3.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_hkdf_matches_the_cryptography_implementation_and_checks_length() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    rng = np.random.default_rng(7)
    for length in (1, 16, 32, 33, 64, 100, 255 * 32):
        ikm, info = rng.bytes(32), rng.bytes(int(rng.integers(0, 80)))
        for salt in (None, b"", rng.bytes(13), rng.bytes(100)):
            want = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
            assert prim.hkdf_sha256(ikm, info=info, length=length, salt=salt) == want
    for bad in (0, 255 * 32 + 1, 1.5):
        with pytest.raises(ConfigError, match="'length' parameter of hkdf_sha256"):
            prim.hkdf_sha256(b"k" * 32, info=b"", length=bad)  # type: ignore[arg-type]


def test_derived_keys_are_separated_by_label_and_context() -> None:
    secret = bytes(32)
    a = prim.derive_key(secret, label="pairwise-mask", context=b"r1")
    assert a == prim.derive_key(secret, label="pairwise-mask", context=b"r1")
    assert a != prim.derive_key(secret, label="share-encryption", context=b"r1")
    assert a != prim.derive_key(secret, label="pairwise-mask", context=b"r2")
    with pytest.raises(ConfigError):
        prim.derive_key(secret, label="")


def test_aead_roundtrip_and_tamper_detection() -> None:
    key = bytes(range(32))
    ct = prim.encrypt(key, b"share bundle", associated_data=b"ad")
    assert prim.decrypt(key, ct, associated_data=b"ad") == b"share bundle"
    flipped = bytearray(ct)
    flipped[-1] ^= 1
    with pytest.raises(CryptoError, match="authentication"):
        prim.decrypt(key, bytes(flipped), associated_data=b"ad")
    with pytest.raises(CryptoError, match="authentication"):
        prim.decrypt(key, ct, associated_data=b"other receiver")
    with pytest.raises(CryptoError, match="too short"):
        prim.decrypt(key, b"x", associated_data=b"ad")


def test_commitment_binds_context() -> None:
    seed = bytes(range(32))
    assert prim.commitment(seed, context=b"a") == prim.commitment(seed, context=b"a")
    assert prim.commitment(seed, context=b"a") != prim.commitment(seed, context=b"b")


# --------------------------------------------------------------------------- Shamir


def test_shamir_known_answer_small_polynomial() -> None:
    # f(x) = 1234 + 166 x + 94 x^2 (the textbook example): shares and reconstruction.
    shares = prim.shamir_evaluate([1234, 166, 94], range(1, 7))
    assert [s.y for s in shares] == [1494, 1942, 2578, 3402, 4414, 5614]
    for combo in itertools.combinations(shares, 3):
        assert int.from_bytes(prim.shamir_reconstruct(list(combo), secret_len=32), "big") == 1234


def test_shamir_known_answer_wraps_the_field() -> None:
    # f(x) = 5 + (p - 1) x  =>  f(1) = 4, f(2) = 3 (mod p); reconstruction gives 5.
    shares = prim.shamir_evaluate([5, prim.SHAMIR_PRIME - 1], [1, 2])
    assert [s.y for s in shares] == [4, 3]
    assert prim.shamir_reconstruct(shares, secret_len=32) == (5).to_bytes(32, "big")


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not() -> None:
    secret = bytes(range(1, 33))
    shares = prim.shamir_split(secret, threshold=4, xs=[3, 9, 11, 20, 21, 40])
    for combo in itertools.combinations(shares, 4):
        assert prim.shamir_reconstruct(list(combo), secret_len=32) == secret
    with pytest.raises(CryptoError):  # 3 points interpolate a random 521-bit value
        prim.shamir_reconstruct(shares[:3], secret_len=32)


def test_shamir_share_serialisation_and_corruption() -> None:
    secret = bytes(range(32))
    shares = prim.shamir_split(secret, threshold=2, xs=[1, 2, 3])
    data = prim.share_to_bytes(shares[0])
    assert len(data) == prim.SHARE_BYTES
    assert prim.share_from_bytes(1, data) == shares[0]
    with pytest.raises(CryptoError, match="66 bytes"):
        prim.share_from_bytes(1, data[:-1])
    with pytest.raises(CryptoError, match="outside the field"):
        prim.share_from_bytes(1, b"\xff" * prim.SHARE_BYTES)
    # A random-looking corruption is caught by the width check (a small one is not:
    # that is why the protocol verifies reconstructions against commitments).
    bad = prim.ShamirShare(x=1, y=(shares[0].y + 2**300) % prim.SHAMIR_PRIME)
    with pytest.raises(CryptoError, match="corrupt"):
        prim.shamir_reconstruct([bad, shares[1]], secret_len=32)
    nudged = prim.ShamirShare(x=1, y=(shares[0].y + 1) % prim.SHAMIR_PRIME)
    assert prim.shamir_reconstruct([nudged, shares[1]], secret_len=32) != secret
    with pytest.raises(CryptoError, match="distinct"):
        prim.shamir_reconstruct([shares[0], shares[0]], secret_len=32)


def test_shamir_split_validates_arguments() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        prim.shamir_split(b"s" * 32, threshold=4, xs=[1, 2, 3])
    with pytest.raises(ConfigError, match="distinct"):
        prim.shamir_split(b"s" * 32, threshold=2, xs=[1, 1, 2])
    with pytest.raises(ConfigError, match="secret"):
        prim.shamir_split(b"", threshold=1, xs=[1])
