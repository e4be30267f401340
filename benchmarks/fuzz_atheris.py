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

import numpy as np  # noqa: E402
from flwr.common.serde import recorddict_from_proto  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402

TARGETS = ("npz", "csv", "mqtt", "reply")
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
