"""Property-based fuzzing of every parser at a trust boundary.

Each parser gets arbitrary or mutated input and must either return a valid
object or raise the package's own error (a ConsortiumError subclass naming the
problem): never another exception, never a hang (hypothesis deadlines), never
silent acceptance of something invalid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=E0611
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from consortium.data import Dataset, load_csv, load_npz
from consortium.edge.messages import Alert, MessageError, make_msg_id, parse_message
from consortium.errors import ConsortiumError
from consortium.federation.validation import (
    InvalidUpdateError,
    contribution_from_reply,
    histograms_from_reply,
    info_from_reply,
)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
REF = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]

# ------------------------------------------------------------------ files


@FUZZ
@given(data=st.binary(max_size=2000))
def test_npz_loader_on_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.npz"
    path.write_bytes(data)
    try:
        ds = load_npz(path)
    except ConsortiumError:
        return
    assert isinstance(ds, Dataset)  # pragma: no cover - random bytes are never a valid archive


npz_arrays = st.one_of(
    hnp.arrays(dtype=hnp.scalar_dtypes(), shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
    hnp.arrays(dtype=st.sampled_from([np.float64, np.float32]), shape=st.tuples(st.integers(0, 6),
                                                                                          st.integers(0, 4)),
               elements=st.floats(allow_nan=True, allow_infinity=True, width=32) | st.just(0.0)),
)


@FUZZ
@given(X=npz_arrays, y=npz_arrays, extra=st.booleans())
def test_npz_loader_on_arbitrary_arrays(tmp_path: Path, X: np.ndarray, y: np.ndarray, extra: bool) -> None:
    path = tmp_path / "x.npz"
    entries = {"X": X, "y": y}
    if extra:
        entries["feature_names"] = np.array(["a"] * (X.shape[-1] if X.ndim else 1))
    with path.open("wb") as handle:
        np.savez(handle, **entries)
    try:
        ds = load_npz(path)
    except ConsortiumError as exc:
        assert "x.npz" in str(exc) or "'X'" in str(exc) or "'y'" in str(exc) or str(exc)
        return
    # Accepted: then it really is a valid dataset.
    assert ds.X.ndim == 2 and ds.y.ndim == 1 and len(ds.y) == ds.X.shape[0]
    assert np.all(np.isfinite(ds.X)) and set(np.unique(ds.y)) <= {0, 1}


csv_cell = st.one_of(st.integers(-5, 5).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                     st.text(max_size=4), st.just(""), st.just("label"))


@FUZZ
@given(rows=st.lists(st.lists(csv_cell, min_size=0, max_size=4), max_size=6), raw=st.binary(max_size=200),
       use_raw=st.booleans())
def test_csv_loader_on_arbitrary_tables(tmp_path: Path, rows: list[list[str]], raw: bytes, use_raw: bool) -> None:
    path = tmp_path / "x.csv"
    if use_raw:
        path.write_bytes(raw)
    else:
        path.write_text("\n".join(",".join(r) for r in [["a", "label"], *rows]), encoding="utf-8")
    try:
        ds = load_csv(path, label_column="label")
    except ConsortiumError:
        return
    assert np.all(np.isfinite(ds.X)) and set(np.unique(ds.y)) <= {0, 1} and ds.X.shape[0] == len(ds.y)


# ------------------------------------------------------------------ MQTT payloads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
topics = st.one_of(
    st.text(max_size=40),
    st.builds(lambda i, a, k: f"consortium/{i}/{a}/{k}", st.text(max_size=6), st.text(max_size=6),
              st.sampled_from(["alerts", "telemetry", "status", "events", "drift", "counts", "commands", "x"])),
)


@FUZZ
@given(topic=topics, payload=st.one_of(st.binary(max_size=300), json_values.map(json.dumps)))
def test_mqtt_parser_on_arbitrary_messages(topic: str, payload: bytes | str) -> None:
    try:
        parse_message(topic, payload)
    except MessageError:
        pass


@FUZZ
@given(field=st.sampled_from(["score", "institution", "agent", "msg_id", "ts", "threshold", "model_version",
                              "transaction_id"]),
       value=json_values | st.sampled_from([float("nan"), float("inf"), -1e308, 2**70]))
def test_mqtt_parser_on_mutated_alerts(field: str, value: object) -> None:
    alert = Alert(institution="bank_a", agent="pos-1", msg_id=make_msg_id("bank_a", "pos-1", 1), ts=1.0,
                  transaction_id="t1", score=0.9, threshold=0.5, model_version="v1")
    body = json.loads(alert.to_json())
    body[field] = value
    try:
        _, parsed = parse_message("consortium/bank_a/pos-1/alerts", json.dumps(body))
    except MessageError:
        return
    assert parsed.institution == "bank_a" and math.isfinite(parsed.score)


# ------------------------------------------------------------------ replies at the coordinator

small_arrays = hnp.arrays(dtype=hnp.scalar_dtypes(), shape=hnp.array_shapes(min_dims=0, max_dims=2, max_side=4))
metric_values = st.one_of(st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
                          st.lists(st.floats(width=32), max_size=2))


@st.composite
def array_entries(draw: st.DrawFn) -> Array:
    if draw(st.booleans()):
        return Array(draw(small_arrays))
    # Hand-made Array with arbitrary header fields and payload bytes.
    return Array(dtype=draw(st.sampled_from(["float32", "<f4", "int8", "object", "zz"])),
                 shape=tuple(draw(st.lists(st.integers(0, 4), max_size=3))),
                 stype=draw(st.sampled_from(["numpy.ndarray", "torch.Tensor", "?"])),
                 data=draw(st.binary(max_size=64)))


@st.composite
def replies(draw: st.DrawFn) -> RecordDict:
    content = RecordDict()
    if draw(st.booleans()):
        names = draw(st.lists(st.text(min_size=1, max_size=5), max_size=3, unique=True))
        content["update"] = ArrayRecord({n: draw(array_entries()) for n in names})
    elif draw(st.booleans()):
        content["update"] = ArrayRecord.from_numpy_ndarrays(
            [draw(hnp.arrays(dtype=st.sampled_from([np.float32, np.float64]), shape=r.shape,
                             elements=st.floats(width=32, allow_nan=True, allow_infinity=True))) for r in REF])
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(["num-examples", "train-loss", "disclosed", "x"]), unique=True))
        try:
            content["metrics"] = MetricRecord({k: draw(metric_values) for k in keys})  # type: ignore[misc]
        except (TypeError, ValueError):
            pass
    if draw(st.booleans()):
        content["info"] = ConfigRecord({"institution": draw(st.text(max_size=8) | st.integers(-(2**62), 2**62)),
                                        "feature-names": draw(st.lists(st.text(max_size=3), max_size=3)),
                                        "disclose-eval": draw(st.booleans() | st.integers(0, 1))})
    if draw(st.booleans()):
        content["val-histogram"] = ArrayRecord({"neg": draw(array_entries()), "pos": draw(array_entries())})
    return content


@FUZZ
@given(content=replies(), max_norm=st.sampled_from([None, 1.0]))
def test_coordinator_reply_parsers_on_arbitrary_recorddicts(content: RecordDict, max_norm: float | None) -> None:
    try:
        arrays, weight, metrics = contribution_from_reply(content, institution="x", reference=REF, max_norm=max_norm)
    except InvalidUpdateError:
        pass
    else:
        assert [a.shape for a in arrays] == [r.shape for r in REF] and weight > 0
        assert all(np.all(np.isfinite(a)) for a in arrays) and all(math.isfinite(v) for v in metrics.values())
    for parse in (lambda c: histograms_from_reply(c, institution="x", bins=4),
                  lambda c: info_from_reply(c, institution="x"),
                  lambda c: contribution_from_reply(c, institution="x", reference=None)):
        try:
            parse(content)
        except InvalidUpdateError:
            pass


@FUZZ
@given(content=replies(), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       raw=st.binary(max_size=200), use_raw=st.booleans())
def test_coordinator_on_corrupted_wire_bytes(content: RecordDict, flips: list[tuple[int, int]], raw: bytes,
                                             use_raw: bool) -> None:
    """Bytes off the wire: Flower's decoder refuses or yields a RecordDict; our parsers then decide."""
    try:
        data = bytearray(recorddict_to_proto(content).SerializeToString())
    except (ValueError, TypeError):
        assume(False)  # not encodable in the first place (e.g. an int beyond int64)
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    payload = raw if use_raw else bytes(data)
    try:
        decoded = recorddict_from_proto(ProtoRecordDict.FromString(payload))
    except (DecodeError, ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError):
        # Refused by Flower's wire layer before it reaches consortium code (a flipped byte can leave a
        # record value's oneof unset, which flwr's serde_utils meets with an AttributeError).
        return
    try:
        contribution_from_reply(decoded, institution="x", reference=REF)
    except InvalidUpdateError:
        pass


def test_the_fuzzers_can_fail() -> None:
    """The properties above catch a parser that lets a bad value through."""
    bad = RecordDict({"update": ArrayRecord.from_numpy_ndarrays([np.full((3, 2), np.nan, np.float32), REF[1]]),
                      "metrics": MetricRecord({"num-examples": 10})})
    with pytest.raises(InvalidUpdateError, match="NaN"):
        contribution_from_reply(bad, institution="x", reference=REF)
    with pytest.raises(MessageError):
        parse_message("consortium/bank_a/pos-1/alerts", b"\xff")


# ------------------------------------------------------------------ signed bundles (registry branch)


@pytest.fixture(scope="module")
def signed_bundle() -> tuple[bytes, object, object]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from consortium.registry.bundle import BundleManifest, FeatureSpec, bundle_bytes  # noqa: PLC0415

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    manifest = BundleManifest(model_version="m-1", kind="mlp", features=(FeatureSpec("a"),),
                              thresholds={"default": 0.5}, input_name="x", output_name="y")
    return bundle_bytes(onnx_model=b"not really onnx", manifest=manifest, private_key=key), key.public_key(), \
        other.public_key()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 100_000), mode=st.sampled_from(["flip", "truncate", "wrong-key"]))
def test_bundle_reader_refuses_every_tampered_bundle(signed_bundle, flips, cut: int, mode: str) -> None:  # type: ignore[no-untyped-def]
    from consortium.registry.bundle import BundleError, read_bundle  # noqa: PLC0415

    data, public, other = signed_bundle
    assert read_bundle(data, public_key=public).onnx_bytes == b"not really onnx"
    tampered = bytearray(data)
    if mode == "flip":
        for pos, xor in flips:
            tampered[pos % len(tampered)] ^= xor
    elif mode == "truncate":
        tampered = tampered[: cut % len(tampered)]
    key = other if mode == "wrong-key" else public
    try:
        bundle = read_bundle(bytes(tampered), public_key=key)
    except BundleError:
        return
    # Accepted only if what it says is what was signed (a flip in zip padding/metadata can be harmless).
    assert mode == "flip" and bundle.onnx_bytes == b"not really onnx" and bundle.manifest.model_version == "m-1"
