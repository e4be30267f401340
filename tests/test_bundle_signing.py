"""Signing keys (0600 rules, no key material in errors) and signed bundles (every refusal names its cause)."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ConfigError, ConsortiumError
from consortium.keyfiles import check_private_key_file
from consortium.registry.bundle import (
    MANIFEST_NAME,
    MODEL_NAME,
    SIGNATURE_NAME,
    BundleError,
    BundleManifest,
    FeatureSpec,
    bundle_bytes,
    canonical_manifest_json,
    check_compatible,
    read_bundle,
    sha256_hex,
    write_bundle,
)
from consortium.registry.signing import (
    SigningKeyError,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    load_public_key,
    public_key_path,
)

ONNX = b"\x08\x07fake-onnx-model-bytes" * 10


def make_manifest(**changes: object) -> BundleManifest:
    base = BundleManifest(
        model_version="fraud-r3",
        parent_version="fraud-r2",
        kind="mlp",
        features=(FeatureSpec("amount", "float32", 0.0, 900.0), FeatureSpec("hour", "float32", 0.0, 23.0)),
        thresholds={"default": 0.7, "fpr_1pct": 0.8},
        run_id="run123",
        metrics={"auprc": 0.81},
        privacy={"epsilon": 3.2, "delta": 1e-5, "mechanism": "dp-sgd"},
        created_at="2026-12-04T12:00:00Z",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return generate_signing_key(tmp_path / "signing.pem")


@pytest.fixture
def private_key(key_path: Path) -> Ed25519PrivateKey:
    return load_private_key(key_path)


# ------------------------------------------------------------------------ keys


def test_generate_writes_0600_private_and_public_key(tmp_path: Path) -> None:
    path = generate_signing_key(tmp_path / "k.pem")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pub = public_key_path(path)
    assert pub.name == "k.pem.pub"
    private = load_private_key(path)
    public = load_public_key(pub)
    assert key_fingerprint(private) == key_fingerprint(public)
    assert load_public_key(pub.read_bytes()) is not None
    assert key_fingerprint(load_public_key(pub.read_text())) == key_fingerprint(public)


def test_generate_refuses_to_overwrite_unless_asked(key_path: Path) -> None:
    before = key_path.read_bytes()
    with pytest.raises(SigningKeyError, match="Refusing to overwrite"):
        generate_signing_key(key_path)
    assert key_path.read_bytes() == before
    generate_signing_key(key_path, overwrite=True)
    assert key_path.read_bytes() != before
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_private_key_readable_by_others_is_refused(key_path: Path, mode: int) -> None:
    os.chmod(key_path, mode)
    with pytest.raises(SigningKeyError) as info:
        load_private_key(key_path)
    # The one private-key message (consortium.keyfiles), only the exception type differs.
    with pytest.raises(ConfigError) as common:
        check_private_key_file(key_path, what="signing key")
    assert str(info.value) == str(common.value)
    assert f"Got mode {mode:04o} instead. Run `chmod 600 {key_path.resolve()}`" in str(info.value)
    assert "PRIVATE KEY" not in str(info.value)


def test_private_key_errors_name_the_file_and_never_quote_key_data(tmp_path: Path, key_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_private_key(tmp_path / "missing.pem")
    # a public key where a private key is expected
    pub_as_private = tmp_path / "pub.pem"
    pub_as_private.write_bytes(public_key_path(key_path).read_bytes())
    os.chmod(pub_as_private, 0o600)
    with pytest.raises(SigningKeyError, match="PKCS#8") as info:
        load_private_key(pub_as_private)
    assert "BEGIN" not in str(info.value) and info.value.__cause__ is None
    # an RSA key: right format, wrong algorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_path = tmp_path / "rsa.pem"
    rsa_path.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(rsa_path, 0o600)
    with pytest.raises(SigningKeyError, match="must hold an Ed25519 private key"):
        load_private_key(rsa_path)
    with pytest.raises(SigningKeyError, match="public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")


def test_no_key_material_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = generate_signing_key(tmp_path / "k.pem")
    write_bundle(tmp_path / "b.bundle", onnx_model=ONNX, manifest=make_manifest(), private_key=load_private_key(path))
    key_text = path.read_text()
    body = "".join(line for line in key_text.splitlines() if not line.startswith("-----"))
    assert caplog.records
    for record in caplog.records:
        message = record.getMessage()
        assert body not in message and "PRIVATE KEY" not in message


# ------------------------------------------------------------------------ bundles


def test_round_trip_and_deterministic_archive(tmp_path: Path, key_path: Path, private_key: Ed25519PrivateKey) -> None:
    manifest = make_manifest()
    path = write_bundle(tmp_path / "m.bundle", onnx_model=ONNX, manifest=manifest, private_key=private_key)
    bundle = read_bundle(path, public_key=load_public_key(public_key_path(key_path)))
    assert bundle.onnx_bytes == ONNX
    assert bundle.manifest == replace(manifest, files={MODEL_NAME: sha256_hex(ONNX)})
    assert bundle.sha256 == sha256_hex(path.read_bytes())
    assert bundle.key_id == key_fingerprint(private_key)
    # same inputs -> same bytes; reading from bytes works the same
    again = bundle_bytes(onnx_model=ONNX, manifest=manifest, private_key=private_key)
    assert again == path.read_bytes()
    assert read_bundle(again, public_key=private_key.public_key()).manifest == bundle.manifest
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == [MANIFEST_NAME, MODEL_NAME, SIGNATURE_NAME]
        assert archive.read(MANIFEST_NAME) == canonical_manifest_json(bundle.manifest)


def _rezip(data: bytes, changes: dict[str, bytes | None], extra: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            content = changes.get(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
        for name, content in (extra or {}).items():
            dst.writestr(name, content)
    return out.getvalue()


@pytest.fixture
def good(private_key: Ed25519PrivateKey) -> bytes:
    return bundle_bytes(onnx_model=ONNX, manifest=make_manifest(), private_key=private_key)


def test_tampered_model_is_a_hash_mismatch(good: bytes, private_key: Ed25519PrivateKey) -> None:
    bad = _rezip(good, {MODEL_NAME: ONNX + b"x"})
    with pytest.raises(BundleError, match="hash mismatch for 'model.onnx'"):
        read_bundle(bad, public_key=private_key.public_key())


def test_tampered_manifest_is_a_bad_signature(good: bytes, private_key: Ed25519PrivateKey) -> None:
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        manifest = json.loads(archive.read(MANIFEST_NAME))
    manifest["thresholds"]["default"] = 0.99
    bad = _rezip(good, {MANIFEST_NAME: json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()})
    with pytest.raises(BundleError, match="bad signature.*tampered"):
        read_bundle(bad, public_key=private_key.public_key())


def test_unsigned_bundle_is_refused(good: bytes, private_key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match="unsigned"):
        read_bundle(_rezip(good, {SIGNATURE_NAME: None}), public_key=private_key.public_key())


def test_wrong_key_is_named(good: bytes) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(BundleError, match="wrong key"):
        read_bundle(good, public_key=other)


def test_forged_key_id_still_fails_the_signature(private_key: Ed25519PrivateKey) -> None:
    attacker = Ed25519PrivateKey.generate()
    forged = bundle_bytes(onnx_model=ONNX, manifest=make_manifest(), private_key=attacker)
    with zipfile.ZipFile(io.BytesIO(forged)) as archive:
        signature = json.loads(archive.read(SIGNATURE_NAME))
    signature["key_id"] = key_fingerprint(private_key)
    bad = _rezip(forged, {SIGNATURE_NAME: json.dumps(signature).encode()})
    with pytest.raises(BundleError, match="bad signature"):
        read_bundle(bad, public_key=private_key.public_key())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not a zip at all", "not a bundle archive"),
        (b"", "not a bundle archive"),
    ],
)
def test_garbage_is_not_a_bundle(data: bytes, match: str, private_key: Ed25519PrivateKey) -> None:
    with pytest.raises(BundleError, match=match):
        read_bundle(data, public_key=private_key.public_key())


def test_structure_problems_are_named(good: bytes, private_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    public = private_key.public_key()
    with pytest.raises(BundleError, match="unexpected member"):
        read_bundle(_rezip(good, {}, {"evil.sh": b"rm -rf /"}), public_key=public)
    with pytest.raises(BundleError, match="'model.onnx' is missing"):
        read_bundle(_rezip(good, {MODEL_NAME: None}), public_key=public)
    with pytest.raises(BundleError, match="malformed signature"):
        read_bundle(_rezip(good, {SIGNATURE_NAME: b"{"}), public_key=public)
    with pytest.raises(BundleError, match="does not exist"):
        read_bundle(tmp_path / "nope.bundle", public_key=public)
    corrupt = bytearray(good)
    start = corrupt.find(b"fake") if b"fake" in corrupt else len(corrupt) // 3
    corrupt[start + 1] ^= 0xFF
    with pytest.raises(BundleError):
        read_bundle(bytes(corrupt), public_key=public)


def test_unknown_format_version_signed_by_the_right_key(private_key: Ed25519PrivateKey) -> None:
    good = bundle_bytes(onnx_model=ONNX, manifest=make_manifest(), private_key=private_key)
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        manifest = json.loads(archive.read(MANIFEST_NAME))
    manifest["format_version"] = 2
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    signature = {
        "algorithm": "ed25519",
        "key_id": key_fingerprint(private_key),
        "signature": __import__("base64").b64encode(private_key.sign(manifest_bytes)).decode(),
    }
    bad = _rezip(good, {MANIFEST_NAME: manifest_bytes, SIGNATURE_NAME: json.dumps(signature).encode()})
    with pytest.raises(BundleError, match="Unknown bundle format version 2"):
        read_bundle(bad, public_key=private_key.public_key())


def test_bundle_error_is_a_consortium_error() -> None:
    assert issubclass(BundleError, ConsortiumError)


# ------------------------------------------------------------------------ compatibility


def test_check_compatible() -> None:
    old = make_manifest()
    check_compatible(old, make_manifest(model_version="fraud-r4", kind="gbdt", thresholds={"default": 0.1}))
    with pytest.raises(BundleError, match=r"removed \['hour'\], added \['minute'\]"):
        check_compatible(old, make_manifest(features=(FeatureSpec("amount"), FeatureSpec("minute"))))
    with pytest.raises(BundleError, match="order differs at position 0"):
        check_compatible(old, make_manifest(features=(FeatureSpec("hour"), FeatureSpec("amount"))))
    with pytest.raises(BundleError, match="'hour' changes dtype from float32 to int64"):
        check_compatible(old, make_manifest(features=(FeatureSpec("amount"), FeatureSpec("hour", "int64"))))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"thresholds": {"strict": 0.9}}, "must contain the key 'default'"),
        ({"thresholds": {"default": float("nan")}}, "thresholds.default"),
        ({"model_version": "../etc/passwd"}, "model_version"),
        ({"features": ()}, "non-empty list"),
        ({"features": (FeatureSpec("a"), FeatureSpec("a"))}, "unique names"),
        ({"privacy": {"epsilon": 1.0}}, "privacy"),
        ({"privacy": {"epsilon": 1.0, "delta": 2.0, "mechanism": "x"}}, r"delta' must be in \[0, 1\)"),
        ({"privacy": {"epsilon": 1.0, "delta": 1e-5, "mechanism": "x", "sigma": 1.0}}, "optionally 'params'"),
        ({"privacy": {"epsilon": 1.0, "delta": 1e-5, "mechanism": "x", "params": [1.0]}}, "privacy.params"),
        ({"privacy": {"epsilon": 1.0, "delta": 1e-5, "mechanism": "x", "params": {"s": float("nan")}}},
         "finite JSON"),
        ({"privacy": {"epsilon": 1.0, "delta": 1e-5, "mechanism": "x", "params": {"s": "x" * 9000}}},
         "at most 8192"),
        ({"created_at": "2026-12-04 12:00"}, "created_at"),
        ({"files": {"model.onnx": "abc"}}, "SHA-256"),
        ({"extra": {"x": float("inf")}}, "extra.x"),
    ],
)
def test_manifest_refuses_bad_values(changes: dict[str, object], match: str) -> None:
    with pytest.raises(BundleError, match=match):
        make_manifest(**changes)


def test_privacy_parameters_travel_signed_in_the_bundle(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    """Every saved model carries its (ε, δ), mechanism *and* the mechanism's parameters."""
    privacy = {
        "epsilon": 0.999, "delta": 1e-5, "mechanism": "dpsgd-secagg",
        "params": {"noise_multiplier": 2.1968, "clip_norm": 3.0, "participants": 5, "epsilon_if_one_colludes": 1.15},
    }  # fmt: skip
    path = write_bundle(tmp_path / "p.bundle", onnx_model=ONNX, manifest=make_manifest(privacy=privacy),
                        private_key=private_key)  # fmt: skip
    assert read_bundle(path, public_key=private_key.public_key()).manifest.privacy == privacy
    assert make_manifest().privacy == {"epsilon": 3.2, "delta": 1e-5, "mechanism": "dp-sgd"}  # params optional


def test_feature_spec_checks_range() -> None:
    with pytest.raises(BundleError, match="min <= max"):
        FeatureSpec("x", "float32", 2.0, 1.0)
    with pytest.raises(BundleError, match="dtype"):
        FeatureSpec("x", "complex64")
