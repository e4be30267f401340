"""Feature engineering for card transactions, vectorised with NumPy.

The features follow the *Reproducible Machine Learning for Credit Card Fraud
Detection* handbook (Le Borgne et al.): calendar features, the customer's own
spending history over sliding windows, and the terminal's fraud history over
sliding windows that end a *label delay* before the transaction — because in
practice a fraud is only known (charged back, investigated) days after it
happened, so a model must not see fresher labels than that.

All windows are computed without a Python loop per transaction: rows are sorted by
``(entity, time)``, packed into one monotone key ``entity * span + time`` and the
window edges are found with :func:`numpy.searchsorted`; sums come from
cumulative sums.  The result is one float32 matrix whose columns are named by
:data:`FEATURE_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consortium.errors import DataError

SECONDS_PER_HOUR = 3_600.0
SECONDS_PER_DAY = 86_400.0
LABEL_DELAY_DAYS = 7
"""Terminal fraud labels become known this many days after the transaction."""
CUSTOMER_WINDOWS_DAYS = (1, 7, 30)
TERMINAL_WINDOWS_DAYS = (1, 7, 30)
NIGHT_END_HOUR = 6
"""Transactions between midnight and this hour count as night-time."""
GAP_CAP_SECONDS = 30 * SECONDS_PER_DAY
"""Gap reported for a customer's first transaction, and the largest gap reported."""

FEATURE_NAMES: tuple[str, ...] = (
    "amount",
    "log_amount",
    "hour_sin",
    "hour_cos",
    "weekday_sin",
    "weekday_cos",
    "is_weekend",
    "is_night",
    "customer_n_tx_1h",
    "customer_n_tx_1d",
    "customer_mean_amount_1d",
    "customer_n_tx_7d",
    "customer_mean_amount_7d",
    "customer_n_tx_30d",
    "customer_mean_amount_30d",
    "amount_to_customer_mean_30d",
    "terminal_n_tx_1d",
    "terminal_risk_1d",
    "terminal_n_tx_7d",
    "terminal_risk_7d",
    "terminal_n_tx_30d",
    "terminal_risk_30d",
    "seconds_since_customer_prev_tx",
)
"""Names of the engineered columns, in matrix order (the same for every institution)."""


@dataclass(frozen=True)
class _SortedEntity:
    """Rows of one entity kind (customers or terminals) sorted by (entity, time)."""

    order: np.ndarray  # positions into the original rows
    key: np.ndarray  # entity * span + relative time, non-decreasing
    entity: np.ndarray  # entity id of each sorted row


def _sort_by_entity(entity: np.ndarray, t_rel: np.ndarray, span: float) -> _SortedEntity:
    order = np.lexsort((t_rel, entity))
    ent = entity[order]
    key = ent.astype(np.float64) * span + t_rel[order]
    return _SortedEntity(order=order, key=key, entity=ent)


def _customer_features(
    s: _SortedEntity, amount_sorted: np.ndarray, t_sorted: np.ndarray
) -> dict[str, np.ndarray]:
    """Counts and mean amounts in trailing windows ``(t - w, t]`` (current row included)."""
    n = s.key.size
    pos = np.arange(n)
    csum = np.concatenate(([0.0], np.cumsum(amount_sorted, dtype=np.float64)))
    out: dict[str, np.ndarray] = {}
    left = np.searchsorted(s.key, s.key - SECONDS_PER_HOUR, side="right")
    out["customer_n_tx_1h"] = (pos + 1 - left).astype(np.float64)
    for days in CUSTOMER_WINDOWS_DAYS:
        left = np.searchsorted(s.key, s.key - days * SECONDS_PER_DAY, side="right")
        count = pos + 1 - left
        total = csum[pos + 1] - csum[left]
        out[f"customer_n_tx_{days}d"] = count.astype(np.float64)
        out[f"customer_mean_amount_{days}d"] = total / count
    mean30 = out["customer_mean_amount_30d"]
    out["amount_to_customer_mean_30d"] = amount_sorted / np.maximum(mean30, 0.01)
    gap = np.full(n, GAP_CAP_SECONDS)
    if n > 1:
        same = s.entity[1:] == s.entity[:-1]
        gap[1:] = np.where(same, t_sorted[1:] - t_sorted[:-1], GAP_CAP_SECONDS)
    out["seconds_since_customer_prev_tx"] = np.minimum(gap, GAP_CAP_SECONDS)
    return out


def _terminal_features(s: _SortedEntity, fraud_sorted: np.ndarray) -> dict[str, np.ndarray]:
    """Counts and fraud shares in windows ``[t - delay - w, t - delay)``."""
    delay = LABEL_DELAY_DAYS * SECONDS_PER_DAY
    cfraud = np.concatenate(([0], np.cumsum(fraud_sorted, dtype=np.int64)))
    hi = np.searchsorted(s.key, s.key - delay, side="left")
    out: dict[str, np.ndarray] = {}
    for days in TERMINAL_WINDOWS_DAYS:
        lo = np.searchsorted(s.key, s.key - delay - days * SECONDS_PER_DAY, side="left")
        count = hi - lo
        frauds = cfraud[hi] - cfraud[lo]
        out[f"terminal_n_tx_{days}d"] = count.astype(np.float64)
        out[f"terminal_risk_{days}d"] = np.divide(
            frauds, count, out=np.zeros(count.size, dtype=np.float64), where=count > 0
        )
    return out


def _calendar_features(timestamp: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
    """Amount and time-of-day / day-of-week encodings (day 0 is a Monday)."""
    seconds_of_day = np.mod(timestamp, SECONDS_PER_DAY)
    hour = seconds_of_day / SECONDS_PER_HOUR
    weekday = np.mod(np.floor(timestamp / SECONDS_PER_DAY), 7.0)
    two_pi = 2.0 * np.pi
    return {
        "amount": amount,
        "log_amount": np.log1p(amount),
        "hour_sin": np.sin(two_pi * seconds_of_day / SECONDS_PER_DAY),
        "hour_cos": np.cos(two_pi * seconds_of_day / SECONDS_PER_DAY),
        "weekday_sin": np.sin(two_pi * weekday / 7.0),
        "weekday_cos": np.cos(two_pi * weekday / 7.0),
        "is_weekend": (weekday >= 5).astype(np.float64),
        "is_night": (hour < NIGHT_END_HOUR).astype(np.float64),
    }


def engineer_features(
    *,
    timestamp: np.ndarray,
    amount: np.ndarray,
    customer_id: np.ndarray,
    terminal_id: np.ndarray,
    is_fraud: np.ndarray,
) -> np.ndarray:
    """Compute the :data:`FEATURE_NAMES` columns for a table of transactions.

    Parameters
    ----------
    timestamp : numpy.ndarray
        Seconds since the simulation epoch (day 0 starts on a Monday at 00:00).
    amount : numpy.ndarray
        Transaction amounts (>= 0).
    customer_id, terminal_id : numpy.ndarray
        Integer ids (>= 0) of the paying card and of the terminal.
    is_fraud : numpy.ndarray
        Labels; used only for terminal windows that end ``LABEL_DELAY_DAYS``
        before each transaction, never for the transaction itself.

    Returns
    -------
    numpy.ndarray
        ``float32`` matrix of shape ``(n, len(FEATURE_NAMES))``, rows in input
        order.

    Raises
    ------
    DataError
        If the arrays differ in length or hold negative ids / amounts or
        non-finite times.
    """
    t = np.asarray(timestamp, dtype=np.float64)
    amt = np.asarray(amount, dtype=np.float64)
    cust = np.asarray(customer_id, dtype=np.int64)
    term = np.asarray(terminal_id, dtype=np.int64)
    fraud = np.asarray(is_fraud).astype(np.int64)
    n = t.size
    lengths = {
        "amount": amt.size,
        "customer_id": cust.size,
        "terminal_id": term.size,
        "is_fraud": fraud.size,
    }
    wrong = {k: v for k, v in lengths.items() if v != n}
    if wrong:
        raise DataError(f"engineer_features: timestamp has {n} rows but {wrong} differ.")
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    if not np.isfinite(t).all() or not np.isfinite(amt).all() or (amt < 0).any():
        raise DataError("engineer_features: timestamps and amounts must be finite, amounts >= 0.")
    if cust.min() < 0 or term.min() < 0:
        raise DataError("engineer_features: customer and terminal ids must be >= 0.")

    t_rel = t - t.min()
    span = (
        float(t_rel.max()) + (LABEL_DELAY_DAYS + max(TERMINAL_WINDOWS_DAYS) + 1) * SECONDS_PER_DAY
    )
    columns = _calendar_features(t, amt)

    by_customer = _sort_by_entity(cust, t_rel, span)
    cust_cols = _customer_features(by_customer, amt[by_customer.order], t_rel[by_customer.order])
    by_terminal = _sort_by_entity(term, t_rel, span)
    term_cols = _terminal_features(by_terminal, fraud[by_terminal.order])

    out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    for j, name in enumerate(FEATURE_NAMES):
        if name in columns:
            out[:, j] = columns[name]
        elif name in cust_cols:
            out[by_customer.order, j] = cust_cols[name]
        else:
            out[by_terminal.order, j] = term_cols[name]
    return out
