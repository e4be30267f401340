"""ModelRegistry on SQLite and PostgreSQL: add, list, get, promote per channel, export, verify."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consortium.errors import ConfigError
from consortium.registry import RunStore
from consortium.registry.bundle import BundleError, BundleManifest, FeatureSpec, bundle_bytes, write_bundle
from consortium.registry.registry import ModelRegistry, RegistryError

KEY = Ed25519PrivateKey.generate()


def make_bundle(tmp_path: Path, version: str, *, key: Ed25519PrivateKey = KEY, parent: str | None = None,
                onnx: bytes = b"onnx-bytes") -> Path:
    manifest = BundleManifest(
        model_version=version,
        parent_version=parent,
        kind="mlp",
        features=(FeatureSpec("amount"), FeatureSpec("hour")),
        thresholds={"default": 0.5},
        run_id="run-1",
        metrics={"auprc": 0.75},
        privacy={"epsilon": 1.5, "delta": 1e-5, "mechanism": "dp-sgd"},
        created_at="2026-12-04T10:00:00Z",
    )
    return write_bundle(tmp_path / f"in-{version}.bundle", onnx_model=onnx, manifest=manifest, private_key=key)


@pytest.fixture
def registry(run_store: RunStore, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(run_store, tmp_path / "blobs", public_key=KEY.public_key())


def test_add_list_get_promote(registry: ModelRegistry, tmp_path: Path) -> None:
    first = registry.add(make_bundle(tmp_path, "m-1"))
    assert first.model_version == "m-1" and first.channel == "default" and not first.promoted
    assert first.kind == "mlp" and first.run_id == "run-1" and first.metrics == {"auprc": 0.75}
    assert first.privacy == {"epsilon": 1.5, "delta": 1e-5, "mechanism": "dp-sgd"}
    assert first.path.read_bytes() == (tmp_path / "in-m-1.bundle").read_bytes()
    assert first.path.name == f"m-1.{first.sha256[:16]}.bundle"
    assert first.created_at.isoformat() == "2026-12-04T10:00:00+00:00"
    assert registry.promoted() is None
    registry.add(make_bundle(tmp_path, "m-2", parent="m-1"), promote=True)
    registry.add(make_bundle(tmp_path, "c-1"), channel="canary")
    assert [e.model_version for e in registry.list()] == ["m-1", "m-2", "c-1"]
    assert [e.model_version for e in registry.list(channel="canary")] == ["c-1"]
    promoted = registry.promoted()
    assert promoted is not None and promoted.model_version == "m-2" and promoted.parent_version == "m-1"
    assert registry.promoted("canary") is None
    # Roll back by promoting the earlier version.
    assert registry.promote("m-1").promoted
    assert not registry.get("m-2").promoted and registry.get("m-1").promoted
    assert [(p.model_version, p.previous_version) for p in registry.history()] == [("m-2", None), ("m-1", "m-2")]
    assert registry.manifest("m-2").parent_version == "m-1"


def test_add_is_idempotent_and_versions_are_immutable(registry: ModelRegistry, tmp_path: Path) -> None:
    path = make_bundle(tmp_path, "m-1")
    assert registry.add(path) == registry.add(path)
    assert len(registry.list()) == 1
    other = make_bundle(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, "m-1", onnx=b"other")
    with pytest.raises(RegistryError, match="already registered with another bundle"):
        registry.add(other)
    assert registry.verify("m-1").onnx_bytes == b"onnx-bytes"


def test_refusals_name_the_problem(registry: ModelRegistry, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="wrong key"):
        registry.add(make_bundle(tmp_path, "evil", key=Ed25519PrivateKey.generate()))
    with pytest.raises(RegistryError, match=r"'nope' is not in the registry \(the registry is empty\)"):
        registry.get("nope")
    registry.add(make_bundle(tmp_path, "m-1"))
    with pytest.raises(RegistryError, match=r"latest: \['m-1'\]"):
        registry.promote("m-9")
    with pytest.raises(RegistryError, match="filed under channel 'default', not 'canary'"):
        registry.promote("m-1", channel="canary")
    with pytest.raises(ConfigError, match="channel"):
        registry.list(channel="a/b")
    assert registry.list() and not list((tmp_path / "blobs").glob("evil*"))


def test_tampered_blob_is_detected_on_export_and_verify(registry: ModelRegistry, tmp_path: Path) -> None:
    entry = registry.add(make_bundle(tmp_path, "m-1"))
    out = registry.export("m-1", tmp_path)
    assert out == tmp_path / "m-1.bundle" and out.read_bytes() == entry.path.read_bytes()
    assert registry.verify("m-1", public_key=KEY.public_key()).manifest.model_version == "m-1"
    with pytest.raises(BundleError, match="wrong key"):
        registry.verify("m-1", public_key=Ed25519PrivateKey.generate().public_key())
    entry.path.write_bytes(entry.path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="tampered"):
        registry.verify("m-1")
    with pytest.raises(BundleError, match="tampered"):
        registry.export("m-1", tmp_path / "copy.bundle")
    assert not (tmp_path / "copy.bundle").exists()


def test_registry_without_key_files_but_cannot_verify(run_store: RunStore, tmp_path: Path) -> None:
    registry = ModelRegistry(run_store, tmp_path / "blobs")
    registry.add(make_bundle(tmp_path, "m-1"))
    with pytest.raises(RegistryError, match="public key"):
        registry.verify("m-1")
    # Even without a key, an unsigned bundle is refused.
    data = bundle_bytes(onnx_model=b"x", manifest=registry.manifest("m-1"), private_key=KEY)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in ("manifest.json", "model.onnx"):
            dst.writestr(name, src.read(name))
    with pytest.raises(BundleError, match="unsigned"):
        registry.add(out.getvalue())


def test_registry_survives_reopening(store_url, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with store_url.open() as store:
        ModelRegistry(store, tmp_path / "blobs").add(make_bundle(tmp_path, "m-1"), promote=True)
    with store_url.open() as store:
        again = ModelRegistry(store, tmp_path / "blobs", public_key=KEY.public_key())
        promoted = again.promoted()
        assert promoted is not None and promoted.model_version == "m-1"
        assert again.verify("m-1").manifest.kind == "mlp"
