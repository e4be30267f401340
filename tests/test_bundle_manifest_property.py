"""Property tests of the manifest parser and the bundle reader: any input ends in a result or a BundleError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consortium.registry.bundle import (
    BundleError,
    BundleManifest,
    FeatureSpec,
    bundle_bytes,
    canonical_manifest_json,
    parse_manifest,
    read_bundle,
)

VALID: dict[str, Any] = json.loads(
    canonical_manifest_json(
        BundleManifest(
            model_version="m-1",
            kind="mlp",
            features=(FeatureSpec("a", "float32", 0.0, 1.0), FeatureSpec("b")),
            thresholds={"default": 0.5},
            metrics={"auprc": 0.7},
            privacy={"epsilon": 1.0, "delta": 1e-5, "mechanism": "dp-sgd"},
            files={"model.onnx": "0" * 64},
        )
    )
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse_or_refuse(data: bytes | str) -> None:
    try:
        manifest = parse_manifest(data)
    except BundleError as exc:
        assert str(exc)
        return
    # Whatever is accepted round-trips exactly through the canonical form.
    assert parse_manifest(canonical_manifest_json(manifest)) == manifest


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    _parse_or_refuse(data)


@SETTINGS
@given(json_values)
def test_arbitrary_json(value: object) -> None:
    _parse_or_refuse(json.dumps(value))


@SETTINGS
@given(st.sampled_from(sorted(VALID)), json_values)
def test_one_field_replaced_by_anything(name: str, value: object) -> None:
    _parse_or_refuse(json.dumps({**VALID, name: value}))


@SETTINGS
@given(st.sampled_from(sorted(VALID)))
def test_missing_field(name: str) -> None:
    raw = {key: value for key, value in VALID.items() if key != name}
    optional = {"parent_version", "run_id", "metrics", "privacy", "extra"}
    try:
        parse_manifest(json.dumps(raw))
    except BundleError as exc:
        assert name in str(exc)
        assert name not in optional
    else:
        assert name in optional


@SETTINGS
@given(st.sampled_from(["a", "b"]), st.sampled_from(["name", "dtype", "min", "max", "extra"]), json_values)
def test_feature_field_replaced_by_anything(which: str, key: str, value: object) -> None:
    features = [dict(f) for f in VALID["features"]]
    features[0 if which == "a" else 1][key] = value
    _parse_or_refuse(json.dumps({**VALID, "features": features}))


def test_valid_document_parses() -> None:
    assert parse_manifest(json.dumps(VALID)).model_version == "m-1"


def test_huge_integer_is_refused_not_crashing() -> None:
    raw = {**VALID, "thresholds": {"default": 10**400}}
    try:
        parse_manifest(json.dumps(raw))
    except BundleError as exc:
        assert "thresholds.default" in str(exc)
    else:
        raise AssertionError("a threshold beyond float range was accepted")


@pytest.mark.parametrize("depth", [40, 990, 100_000])
def test_deeply_nested_extra_is_refused_not_crashing(depth: int) -> None:
    doc = json.dumps({**VALID, "extra": {}}, separators=(",", ":"))
    doc = doc.replace('"extra":{}', '"extra":{"a":' + "[" * depth + "]" * depth + "}")
    with pytest.raises(BundleError, match="nested"):
        parse_manifest(doc)


_KEY = Ed25519PrivateKey.generate()
_GOOD = bundle_bytes(onnx_model=b"onnx" * 50, manifest=BundleManifest.from_dict(VALID), private_key=_KEY)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_corrupted_bundle_is_refused_or_unchanged(flips: list[tuple[int, int]]) -> None:
    data = bytearray(_GOOD)
    for position, mask in flips:
        data[position] ^= mask
    try:
        bundle = read_bundle(bytes(data), public_key=_KEY.public_key())
    except BundleError as exc:
        assert str(exc)
        return
    # Only bytes that carry no content (e.g. zip timestamps) were hit: what is served is the signed content.
    original = read_bundle(_GOOD, public_key=_KEY.public_key())
    assert bundle.manifest == original.manifest and bundle.onnx_bytes == original.onnx_bytes


@SETTINGS
@given(st.binary(max_size=2000))
def test_arbitrary_archive_bytes(data: bytes) -> None:
    with pytest.raises(BundleError):
        read_bundle(data, public_key=_KEY.public_key())
