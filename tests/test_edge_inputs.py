"""Input parsing: every bad transaction is refused with a reason, never an unexpected exception (hypothesis)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consortium.edge.inputs import REASONS, InvalidInputError, RowParser
from consortium.edge.messages import MAX_PAYLOAD_BYTES

NAMES = ["amount", "hour", "velocity"]
PARSER = RowParser(NAMES)


def _row(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"transaction_id": "tx-1", "amount": 12.5, "hour": 3, "velocity": -1.0}
    row.update(over)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()


def test_valid_row_in_model_order() -> None:
    tx = PARSER.parse_mapping({"velocity": 2.0, "hour": 1, "transaction_id": 7, "amount": 1e308})
    assert tx.transaction_id == "7" and tx.values == [1e308, 1, 2.0]
    big = PARSER.parse_mapping(_row(amount=1e308, hour=1e308))  # finite values whose sum overflows
    assert big.values[:2] == [1e308, 1e308]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (_row(amount=_DROP), "missing_field"),
        (_row(extra=1.0), "extra_field"),
        (_row(amount="12.5"), "wrong_type"),
        (_row(amount=True), "wrong_type"),
        (_row(amount=None), "wrong_type"),
        (_row(amount=[1]), "wrong_type"),
        (_row(hour=math.nan), "nan"),
        (_row(hour=-math.inf), "nan"),
        (_row(transaction_id=_DROP), "missing_id"),
        (_row(transaction_id=""), "bad_id"),
        (_row(transaction_id=1.5), "bad_id"),
        (_row(transaction_id="x" * 200), "bad_id"),
    ],
)
def test_bad_rows_name_their_reason(row: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        PARSER.parse_mapping(row)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"[1, 2]", "not_object"),
        (b"NaN", "not_object"),
        (b"[" * 100_000, "oversized"),
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed_json"),  # too deep: RecursionError
    ],
    ids=["broken", "not-utf8", "array", "nan", "oversized", "deep"],
)
def test_bad_lines_name_their_reason(line: bytes, reason: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        PARSER.parse_json(line)
    assert info.value.reason == reason


def test_csv_rows() -> None:
    assert PARSER.parse_csv_row({"transaction_id": "a", "amount": "1", "hour": "2", "velocity": "3e1"}).values == [
        1.0, 2.0, 30.0]
    for row, reason in [
        ({"transaction_id": "a", "amount": "x", "hour": "2", "velocity": "3"}, "wrong_type"),
        ({"transaction_id": "a", "amount": "", "hour": "2", "velocity": "3"}, "missing_field"),
        ({"transaction_id": "a", "amount": "nan", "hour": "2", "velocity": "3"}, "nan"),
        ({"transaction_id": "a", "amount": "1", "hour": "2", "velocity": "3", None: ["9"]}, "extra_field"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            PARSER.parse_csv_row(row)  # type: ignore[arg-type]
        assert info.value.reason == reason


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_are_parsed_or_refused_with_a_known_reason(line: bytes) -> None:
    try:
        tx = PARSER.parse_json(line)
    except InvalidInputError as exc:
        assert exc.reason in REASONS
        assert str(exc)
    else:
        assert len(tx.values) == 3 and all(math.isfinite(v) for v in tx.values)


VALUE = st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.booleans() | st.text(max_size=3) | st.none()


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries({n: VALUE for n in NAMES}, optional={"transaction_id": st.text(max_size=5) | st.integers(),
                                                               "other": VALUE}),
)
def test_rows_are_accepted_exactly_when_well_formed(row: dict[str, Any]) -> None:
    ok = (
        "other" not in row
        and "transaction_id" in row
        and str(row["transaction_id"]) != ""
        and all(isinstance(row[n], int | float) and not isinstance(row[n], bool) and math.isfinite(row[n])
                for n in NAMES)
    )
    try:
        tx = PARSER.parse_mapping(row)
    except InvalidInputError as exc:
        assert not ok, f"refused a good row: {exc}"
        assert exc.reason in REASONS
    else:
        assert ok and tx.values == [row[n] for n in NAMES]


def test_oversized_limit_is_the_wire_limit() -> None:
    assert MAX_PAYLOAD_BYTES == 64 * 1024
