"""A raw table of simulated card transactions, before feature engineering.

The generator builds legitimate activity and each fraud scenario separately as
:class:`TransactionTable` pieces and then stacks them; keeping the pieces in one
small column-oriented type makes that stacking and the final time ordering
trivial and keeps the per-scenario code free of bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEGIT = 0
"""Scenario id of legitimate transactions."""


@dataclass(frozen=True, eq=False)
class TransactionTable:
    """Column arrays of equal length describing transactions.

    Attributes
    ----------
    customer : numpy.ndarray
        int64 customer (card) ids.
    terminal : numpy.ndarray
        int64 terminal ids.
    timestamp : numpy.ndarray
        float64 seconds since the simulation epoch.
    amount : numpy.ndarray
        float64 amounts.
    scenario : numpy.ndarray
        int64 scenario id per row, ``LEGIT`` (0) for legitimate rows.
    """

    customer: np.ndarray
    terminal: np.ndarray
    timestamp: np.ndarray
    amount: np.ndarray
    scenario: np.ndarray

    def __post_init__(self) -> None:
        n = self.customer.shape[0]
        for field in ("terminal", "timestamp", "amount", "scenario"):
            if getattr(self, field).shape != (n,):
                raise ValueError(f"TransactionTable column '{field}' does not have {n} rows.")

    @property
    def n_rows(self) -> int:
        """Number of transactions."""
        return int(self.customer.shape[0])

    def with_scenario(self, scenario: np.ndarray) -> TransactionTable:
        """The same transactions with new scenario labels."""
        return TransactionTable(self.customer, self.terminal, self.timestamp, self.amount, scenario)

    def with_amount(self, amount: np.ndarray) -> TransactionTable:
        """The same transactions with new amounts."""
        return TransactionTable(self.customer, self.terminal, self.timestamp, amount, self.scenario)

    def take(self, idx: np.ndarray) -> TransactionTable:
        """The rows at positions ``idx``."""
        return TransactionTable(
            self.customer[idx],
            self.terminal[idx],
            self.timestamp[idx],
            self.amount[idx],
            self.scenario[idx],
        )

    @staticmethod
    def empty() -> TransactionTable:
        """A table without rows."""
        return TransactionTable(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.zeros(0, np.int64),
        )

    @staticmethod
    def stack(tables: Sequence[TransactionTable]) -> TransactionTable:
        """Rows of all ``tables``, in the given order."""
        if not tables:
            return TransactionTable.empty()
        return TransactionTable(
            np.concatenate([t.customer for t in tables]).astype(np.int64, copy=False),
            np.concatenate([t.terminal for t in tables]).astype(np.int64, copy=False),
            np.concatenate([t.timestamp for t in tables]).astype(np.float64, copy=False),
            np.concatenate([t.amount for t in tables]).astype(np.float64, copy=False),
            np.concatenate([t.scenario for t in tables]).astype(np.int64, copy=False),
        )

    def sorted_by_time(self) -> TransactionTable:
        """Rows ordered by timestamp (stable, so ties keep their order)."""
        return self.take(np.argsort(self.timestamp, kind="stable"))


def episode_sizes(n_rows: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """Sizes of consecutive episodes (bursts) that add up to exactly ``n_rows``.

    Sizes are drawn uniformly from ``[low, high]``; the last episode is cut short
    so that the total matches the target row count.
    """
    if n_rows <= 0:
        return np.zeros(0, dtype=np.int64)
    n_max = n_rows // max(low, 1) + 1
    sizes = rng.integers(low, high + 1, size=n_max)
    total = np.cumsum(sizes)
    n_ep = int(np.searchsorted(total, n_rows, side="left")) + 1
    sizes = sizes[:n_ep].copy()
    sizes[-1] -= int(total[n_ep - 1] - n_rows)
    return sizes.astype(np.int64)


def burst_offsets(sizes: np.ndarray, mean_gap: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds since the start of its episode for every row of consecutive episodes.

    Within an episode, gaps between rows are exponential with mean ``mean_gap``;
    the first row of each episode is at offset 0.
    """
    total = int(sizes.sum())
    gaps = rng.exponential(mean_gap, size=total)
    first = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    gaps[first[sizes > 0]] = 0.0
    csum = np.cumsum(gaps)
    base = np.repeat(csum[first[sizes > 0]], sizes[sizes > 0])
    return csum - base


def position_in_episode(sizes: np.ndarray) -> np.ndarray:
    """0-based position of each row inside its episode."""
    total = int(sizes.sum())
    first = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return np.arange(total) - np.repeat(first, sizes)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every pair, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    keep = lengths > 0
    starts = np.asarray(starts, dtype=np.int64)[keep]
    lengths = lengths[keep]
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    return np.repeat(starts - first, lengths) + np.arange(int(lengths.sum()))
