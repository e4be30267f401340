"""Property tests of the bundle manifest parser: any input ends in a manifest or a BundleError, never a crash."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consortium.registry.bundle import BundleError, BundleManifest, FeatureSpec, canonical_manifest_json, parse_manifest

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
