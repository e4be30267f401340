"""Coverage-guided fuzzing (atheris/libFuzzer) of the parsers at consortium's trust boundaries.

Usage::

    python benchmarks/fuzz_atheris.py TARGET -max_total_time=10 -seed=1

TARGET is one of ``npz``, ``csv``, ``mqtt``, ``reply``. Each input must end in
a parsed object or the package's own error (``ConsortiumError``); any other
exception is a crash that libFuzzer reports (with the input saved as
``crash-*``) and a non-zero exit. ``benchmarks/faults.py`` runs every target
for a few seconds and counts the runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["consortium"]):
    from consortium.data import load_csv, load_npz
    from consortium.edge.messages import parse_message
    from consortium.errors import ConsortiumError
    from consortium.federation.validation import contribution_from_reply, histograms_from_reply, info_from_reply
    from consortium.registry.bundle import BundleManifest, FeatureSpec, bundle_bytes, read_bundle

import numpy as np  # noqa: E402
from flwr.common.serde import recorddict_from_proto  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

TARGETS = ("npz", "csv", "mqtt", "reply", "bundle")
_TMP = Path(tempfile.mkdtemp(prefix="consortium-fuzz-"))
_REF = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]


def fuzz_npz(data: bytes) -> None:
    path = _TMP / "in.npz"
    path.write_bytes(data)
    try:
        load_npz(path)
    except ConsortiumError:
        pass


def fuzz_csv(data: bytes) -> None:
    path = _TMP / "in.csv"
    path.write_bytes(data)
    try:
        load_csv(path, label_column="label")
    except ConsortiumError:
        pass


def fuzz_mqtt(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.PickValueInList(["alerts", "telemetry", "status", "events", "drift", "counts", "commands", "x"])
    topic = f"consortium/{fdp.ConsumeUnicodeNoSurrogates(6)}/{fdp.ConsumeUnicodeNoSurrogates(6)}/{kind}"
    try:
        parse_message(topic, fdp.ConsumeBytes(fdp.remaining_bytes()))
    except ConsortiumError:
        pass


def fuzz_reply(data: bytes) -> None:
    try:
        content = recorddict_from_proto(ProtoRecordDict.FromString(data))
    except (DecodeError, ValueError, TypeError, KeyError, UnicodeDecodeError):
        return  # refused by Flower's own wire layer
    for parse in (
        lambda: contribution_from_reply(content, institution="x", reference=_REF),
        lambda: contribution_from_reply(content, institution="x", reference=None),
        lambda: histograms_from_reply(content, institution="x", bins=4),
        lambda: info_from_reply(content, institution="x"),
    ):
        try:
            parse()
        except ConsortiumError:
            pass


_BUNDLE_KEY = None


def fuzz_bundle(data: bytes) -> None:
    """Arbitrary bytes, and a valid signed bundle with the input XORed over it."""
    global _BUNDLE_KEY  # noqa: PLW0603 - one key per fuzzing process
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    if _BUNDLE_KEY is None:
        key = Ed25519PrivateKey.generate()
        manifest = BundleManifest(model_version="m-1", kind="mlp", features=(FeatureSpec("a"),),
                                  thresholds={"default": 0.5}, input_name="x", output_name="y")
        _BUNDLE_KEY = (key.public_key(), bundle_bytes(onnx_model=b"onnx", manifest=manifest, private_key=key))
    public, valid = _BUNDLE_KEY
    mixed = bytes(b ^ (data[i] if i < len(data) else 0) for i, b in enumerate(valid)) if data[:1] == b"\x00" else data
    for candidate in (data, mixed):
        try:
            read_bundle(candidate, public_key=public)
        except ConsortiumError:
            pass


def main() -> None:
    """Pick the target from argv[1] and hand the rest of argv to libFuzzer."""
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = sys.argv.pop(1)
    os.chdir(_TMP)  # crash-* files land here, not in the repository
    atheris.Setup(sys.argv, globals()[f"fuzz_{target}"])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
