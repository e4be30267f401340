"""Turn incoming transactions (JSON lines, CSV rows, HTTP bodies) into feature values, or say why not.

A transaction is one JSON object (or CSV row) holding a ``transaction_id`` and
exactly the model's features.  Anything else is refused with an
:class:`InvalidInputError` whose ``reason`` is one of :data:`REASONS` — the agent
counts reasons in ``Telemetry.invalid`` and goes on with the next transaction.

The check is written for the hot path: the common case (all features present,
all numbers, all finite) costs one list comprehension and one ``sum``; only a
failing row pays for finding out which field is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consortium.edge.messages import MAX_PAYLOAD_BYTES
from consortium.errors import DataError

REASONS = (
    "oversized", "malformed_json", "not_object", "missing_id", "bad_id",
    "missing_field", "extra_field", "wrong_type", "nan",
)
"""Why a transaction was refused (keys of ``Telemetry.invalid``)."""

MAX_ID_CHARS = 128


class InvalidInputError(DataError):
    """One transaction could not be scored; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Transaction:
    """A checked transaction: its id and its feature values in model order."""

    transaction_id: str
    values: list[float]


class RowParser:
    """Check transactions against one feature schema.

    Parameters
    ----------
    feature_names : sequence of str
        The model's features in input order.
    id_field : str
        Name of the transaction id field (the only non-feature field allowed).
    """

    def __init__(self, feature_names: Sequence[str], *, id_field: str = "transaction_id") -> None:
        self.feature_names = tuple(feature_names)
        self.id_field = id_field
        self._width = len(self.feature_names) + 1
        self._known = frozenset((*self.feature_names, id_field))

    def parse_mapping(self, row: Mapping[str, Any]) -> Transaction:
        """Check one decoded JSON object; raise :class:`InvalidInputError` naming the problem."""
        try:
            values = [row[name] for name in self.feature_names]
            total = sum(values)
            tx = row[self.id_field]
        except (KeyError, TypeError):
            tx = None
            total = math.nan
        if (
            len(row) != self._width
            or not math.isfinite(total)
            or not (tx.__class__ is str and 0 < len(tx) <= MAX_ID_CHARS or tx.__class__ is int)
            or any(v.__class__ is bool for v in values)
        ):
            error = self._diagnose(row)
            if error is not None:
                raise error
            values = [float(row[n]) for n in self.feature_names]  # finite values whose sum overflowed
        return Transaction(str(tx), values)

    def parse_json(self, line: bytes | str) -> Transaction:
        """Check one JSON line (bytes or text)."""
        if len(line) > MAX_PAYLOAD_BYTES:
            raise InvalidInputError(
                "oversized", f"Transaction of {len(line)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit."
            )
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidInputError("malformed_json", f"Transaction is not valid JSON ({exc}).") from None
        if not isinstance(row, dict):
            raise InvalidInputError(
                "not_object", f"Transaction must be a JSON object. Got {type(row).__name__} instead."
            )
        return self.parse_mapping(row)

    def parse_csv_row(self, row: Mapping[str, str | None]) -> Transaction:
        """Check one ``csv.DictReader`` row (all text): numbers are parsed, empty cells are missing."""
        converted: dict[str, Any] = {}
        for key, text in row.items():
            if key is None:  # more cells than header columns
                raise InvalidInputError("extra_field", "CSV row has more cells than the header has columns.")
            if text is None or text == "":
                continue
            if key == self.id_field:
                converted[key] = text
                continue
            try:
                converted[key] = float(text)
            except ValueError:
                raise InvalidInputError(
                    "wrong_type", f"Field {key!r} must be a number. Got {text!r:.40} instead."
                ) from None
        return self.parse_mapping(converted)

    def _diagnose(self, row: Mapping[str, Any]) -> InvalidInputError | None:
        """Find the precise reason a row failed the fast check (slow path); None if it is fine after all."""
        if not isinstance(row, Mapping):
            return InvalidInputError("not_object", f"Transaction must be an object. Got {type(row).__name__} instead.")
        if self.id_field not in row:
            return InvalidInputError("missing_id", f"Field {self.id_field!r} (the transaction id) is missing.")
        tx = row[self.id_field]
        if isinstance(tx, bool) or not isinstance(tx, str | int) or len(str(tx)) > MAX_ID_CHARS or str(tx) == "":
            return InvalidInputError(
                "bad_id", f"Field {self.id_field!r} must be a non-empty string or integer of at most "
                f"{MAX_ID_CHARS} characters. Got {type(tx).__name__} {tx!r:.40} instead."
            )
        missing = [n for n in self.feature_names if n not in row]
        if missing:
            return InvalidInputError("missing_field", f"Field(s) {missing[:5]} missing ({len(missing)} in all).")
        extra = sorted(str(k) for k in row if k not in self._known)
        if extra:
            return InvalidInputError("extra_field", f"Unexpected field(s) {extra[:5]} ({len(extra)} in all).")
        for name in self.feature_names:
            v = row[name]
            if isinstance(v, bool) or not isinstance(v, int | float):
                return InvalidInputError(
                    "wrong_type", f"Field {name!r} must be a number. Got {type(v).__name__} {v!r:.40} instead."
                )
            if not math.isfinite(v):
                return InvalidInputError("nan", f"Field {name!r} must be finite. Got {v!r} instead.")
        return None  # every value finite, only their sum overflowed
