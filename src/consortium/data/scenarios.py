"""Fraud scenarios of the synthetic card-transaction generator.

Each scenario is a recognisable fraud pattern with its own signature in the
engineered features, so that benchmarks can report recall per scenario and a
continual-learning benchmark can switch a scenario on at a known day:

``large_amount`` (id 1)
    A single purchase far above a high threshold, at any terminal.  Legitimate
    big-ticket purchases of big spenders overlap with it.
``compromised_terminal`` (id 2)
    A terminal is compromised for ``COMPROMISE_DAYS`` days; every transaction at
    it in that window is fraud.  Amounts look normal; only the terminal's
    (label-delayed) fraud history reveals it.
``stolen_card_burst`` (id 3)
    A stolen card is used for several purchases of a few times the owner's usual
    amount within a few hours, at arbitrary terminals, at any time of day.
``card_testing`` (id 4)
    Many micro-payments within minutes at one terminal, then one larger purchase.
``account_takeover`` (id 5)
    A taken-over card is used at night for a handful of medium purchases over
    one to three days.  No default profile uses it: it is the "new" scenario to
    introduce with a :class:`ScenarioEvent`.

All scenarios except ``compromised_terminal`` add new rows; that one relabels
legitimate rows (as in the handbook simulator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from consortium.data.population import Population
from consortium.data.transaction_features import SECONDS_PER_DAY, SECONDS_PER_HOUR
from consortium.data.transaction_table import (
    LEGIT,
    TransactionTable,
    burst_offsets,
    episode_sizes,
    position_in_episode,
    ranges,
)
from consortium.errors import param_error

logger = logging.getLogger(__name__)

SCENARIOS: tuple[str, ...] = (
    "large_amount",
    "compromised_terminal",
    "stolen_card_burst",
    "card_testing",
    "account_takeover",
)
"""Scenario names; the id of ``SCENARIOS[i]`` is ``i + 1`` (0 means legitimate)."""
BASE_SCENARIOS: tuple[str, ...] = SCENARIOS[:4]
"""Scenarios that the default institution profiles mix."""
SCENARIO_IDS: Mapping[str, int] = MappingProxyType({s: i + 1 for i, s in enumerate(SCENARIOS)})
"""Scenario name -> integer id as stored in ``SyntheticInstitution.scenario``."""

LARGE_AMOUNT_THRESHOLD = 220.0
"""Fraudulent large amounts start here (times the institution's spending scale)."""
COMPROMISE_DAYS = 14
"""How long a compromised terminal stays compromised."""


def scenario_id(name: str) -> int:
    """The integer id of scenario ``name`` (1-based; 0 is legitimate)."""
    if name not in SCENARIO_IDS:
        raise param_error("scenario", "scenario_id", f"one of {list(SCENARIOS)}", name)
    return SCENARIO_IDS[name]


def scenario_name(sid: int) -> str:
    """The scenario name of id ``sid``; ``"legit"`` for 0."""
    if sid == LEGIT:
        return "legit"
    if not 1 <= sid <= len(SCENARIOS):
        raise param_error("sid", "scenario_name", f"an int in [0, {len(SCENARIOS)}]", sid)
    return SCENARIOS[sid - 1]


@dataclass(frozen=True)
class ScenarioEvent:
    """An extra fraud scenario switched on at a known day (e.g. a new attack).

    Parameters
    ----------
    scenario : str
        One of :data:`SCENARIOS`.
    start_day : int
        First day (absolute, same clock as ``generate_institution(start_day=...)``)
        on which the scenario occurs.
    end_day : int or None
        First day on which it no longer occurs; ``None`` = until the end.
    fraud_rate : float
        Extra frauds of this scenario as a share of the institution's
        transactions while it is active, in (0, 0.1].

    Notes
    -----
    Events of row-adding scenarios leave every other row untouched (they have
    their own random stream); a ``compromised_terminal`` event relabels
    legitimate rows instead.
    """

    scenario: str
    start_day: int
    end_day: int | None = None
    fraud_rate: float = 0.005

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIO_IDS:
            raise param_error(
                "scenario", "ScenarioEvent", f"one of {list(SCENARIOS)}", self.scenario
            )
        if (
            isinstance(self.start_day, bool)
            or not isinstance(self.start_day, int)
            or self.start_day < 0
        ):
            raise param_error("start_day", "ScenarioEvent", "an int >= 0", self.start_day)
        if self.end_day is not None and (
            isinstance(self.end_day, bool)
            or not isinstance(self.end_day, int)
            or self.end_day <= self.start_day
        ):
            raise param_error(
                "end_day",
                "ScenarioEvent",
                f"None or an int > start_day ({self.start_day})",
                self.end_day,
            )
        if not isinstance(self.fraud_rate, int | float) or not 0.0 < self.fraud_rate <= 0.1:
            raise param_error("fraud_rate", "ScenarioEvent", "a float in (0, 0.1]", self.fraud_rate)


@dataclass(frozen=True)
class FraudJob:
    """How many frauds of one scenario to create, and in which days.

    ``start_day`` is inclusive and ``end_day`` exclusive, both absolute days.
    """

    scenario: str
    n_frauds: int
    start_day: int
    end_day: int


def legit_time_of_day(n: int, rng: np.random.Generator) -> np.ndarray:
    """Seconds after midnight of ``n`` legitimate transactions (peak early afternoon)."""
    return np.mod(
        rng.normal(13.5 * SECONDS_PER_HOUR, 4.0 * SECONDS_PER_HOUR, size=n), SECONDS_PER_DAY
    )


def _start_times(
    n: int, job: FraudJob, rng: np.random.Generator, *, uniform_share: float, span_days: int = 0
) -> np.ndarray:
    """Episode start times inside the job's window; a share at a uniform time of day."""
    last = max(job.start_day + 1, job.end_day - span_days)
    day = rng.integers(job.start_day, last, size=n)
    tod = legit_time_of_day(n, rng)
    uniform = rng.random(n) < uniform_share
    tod[uniform] = rng.uniform(0.0, SECONDS_PER_DAY, size=int(uniform.sum()))
    return day * SECONDS_PER_DAY + tod


def _clip_to_window(t: np.ndarray, job: FraudJob) -> np.ndarray:
    return np.minimum(t, job.end_day * SECONDS_PER_DAY - 1.0)


def _table(
    customer: np.ndarray, terminal: np.ndarray, t: np.ndarray, amount: np.ndarray, job: FraudJob
) -> TransactionTable:
    return TransactionTable(
        customer=customer.astype(np.int64),
        terminal=terminal.astype(np.int64),
        timestamp=_clip_to_window(t, job),
        amount=amount,
        scenario=np.full(customer.size, scenario_id(job.scenario), dtype=np.int64),
    )


def _large_amount(
    job: FraudJob, pop: Population, scale: float, rng: np.random.Generator
) -> TransactionTable:
    n = job.n_frauds
    victim = rng.integers(0, pop.n_customers, size=n)
    t = _start_times(n, job, rng, uniform_share=0.5)
    amount = LARGE_AMOUNT_THRESHOLD * scale * (1.0 + rng.exponential(0.6, size=n))
    terminal = rng.integers(0, pop.n_terminals, size=n)
    return _table(victim, terminal, t, amount, job)


def _stolen_card_burst(
    job: FraudJob, pop: Population, scale: float, rng: np.random.Generator
) -> TransactionTable:
    sizes = episode_sizes(job.n_frauds, 3, 8, rng)
    victim = np.repeat(rng.integers(0, pop.n_customers, size=sizes.size), sizes)
    start = np.repeat(_start_times(sizes.size, job, rng, uniform_share=0.6, span_days=1), sizes)
    t = start + burst_offsets(sizes, 25 * 60.0, rng)
    amount = pop.mean_amount[victim] * rng.uniform(1.5, 4.5, size=victim.size)
    terminal = rng.integers(0, pop.n_terminals, size=victim.size)
    return _table(victim, terminal, t, amount, job)


def _card_testing(
    job: FraudJob, pop: Population, scale: float, rng: np.random.Generator
) -> TransactionTable:
    sizes = episode_sizes(job.n_frauds, 6, 15, rng)
    n_ep = sizes.size
    victim = np.repeat(rng.integers(0, pop.n_customers, size=n_ep), sizes)
    start = np.repeat(_start_times(n_ep, job, rng, uniform_share=0.7, span_days=1), sizes)
    offsets = burst_offsets(sizes, 90.0, rng)
    pos = position_in_episode(sizes)
    is_last = pos == np.repeat(sizes - 1, sizes)
    is_last &= np.repeat(sizes >= 6, sizes)  # a cut-short final episode has no big purchase
    offsets[is_last] += rng.exponential(20 * 60.0, size=int(is_last.sum()))
    amount = rng.uniform(0.5, 3.0, size=victim.size)
    amount[is_last] = pop.mean_amount[victim[is_last]] * rng.uniform(
        2.0, 6.0, size=int(is_last.sum())
    )
    terminal = np.repeat(rng.integers(0, pop.n_terminals, size=n_ep), sizes)
    terminal[is_last] = rng.integers(0, pop.n_terminals, size=int(is_last.sum()))
    return _table(victim, terminal, start + offsets, amount, job)


def _account_takeover(
    job: FraudJob, pop: Population, scale: float, rng: np.random.Generator
) -> TransactionTable:
    sizes = episode_sizes(job.n_frauds, 2, 6, rng)
    n_ep = sizes.size
    victim = np.repeat(rng.integers(0, pop.n_customers, size=n_ep), sizes)
    last = max(job.start_day + 1, job.end_day - 3)
    first_day = np.repeat(rng.integers(job.start_day, last, size=n_ep), sizes)
    day = first_day + rng.integers(0, 3, size=victim.size)
    t = day * SECONDS_PER_DAY + rng.uniform(0.0, 5.0 * SECONDS_PER_HOUR, size=victim.size)
    amount = pop.mean_amount[victim] * rng.uniform(1.0, 3.0, size=victim.size)
    terminal = rng.integers(0, pop.n_terminals, size=victim.size)
    return _table(victim, terminal, t, amount, job)


_INJECTORS: Mapping[
    str, Callable[[FraudJob, Population, float, np.random.Generator], TransactionTable]
] = MappingProxyType(
    {
        "large_amount": _large_amount,
        "stolen_card_burst": _stolen_card_burst,
        "card_testing": _card_testing,
        "account_takeover": _account_takeover,
    }
)


def adds_rows(scenario: str) -> bool:
    """Whether ``scenario`` creates new transactions (all but ``compromised_terminal``)."""
    return scenario in _INJECTORS


def inject(
    job: FraudJob, pop: Population, *, spending_scale: float, rng: np.random.Generator
) -> TransactionTable:
    """Create exactly ``job.n_frauds`` fraudulent transactions of ``job.scenario``.

    Parameters
    ----------
    job : FraudJob
        Scenario, count and day window.
    pop : Population
        Customers (victims) and terminals of the institution.
    spending_scale : float
        The institution's spending scale (sets the large-amount threshold).
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    TransactionTable
        The fraud rows, labelled with the scenario's id.
    """
    if job.n_frauds <= 0:
        return TransactionTable.empty()
    return _INJECTORS[job.scenario](job, pop, spending_scale, rng)


def compromise_terminals(
    table: TransactionTable, job: FraudJob, *, n_terminals: int, rng: np.random.Generator
) -> np.ndarray:
    """Relabel legitimate rows at compromised terminals until ``job.n_frauds`` are fraud.

    Candidate (terminal, first day) pairs are drawn at random; each compromises its
    terminal for :data:`COMPROMISE_DAYS` days (cut at the job's window).  Candidates
    are taken in order until the legitimate rows inside their windows reach the
    target, so the realised count exceeds it by less than one episode.

    Parameters
    ----------
    table : TransactionTable
        All transactions so far (only rows still labelled legitimate are changed).
    job : FraudJob
        Target count and day window.
    n_terminals : int
        Number of terminals of the institution.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        The new scenario column.
    """
    scenario = table.scenario.copy()
    legit = np.flatnonzero(scenario == LEGIT)
    if job.n_frauds <= 0 or legit.size == 0:
        return scenario
    t = table.timestamp[legit]
    term = table.terminal[legit]
    t0 = float(t.min()) - SECONDS_PER_DAY
    span = float(t.max() - t0) + (COMPROMISE_DAYS + 2) * SECONDS_PER_DAY
    order = np.lexsort((t, term))
    key = term[order] * span + (t[order] - t0)
    n_window_days = job.end_day - job.start_day
    per_episode = (
        legit.size
        * min(COMPROMISE_DAYS, n_window_days)
        / max(1.0, (t.max() - t.min()) / SECONDS_PER_DAY)
        / n_terminals
    )
    n_cand = int(4 * job.n_frauds / max(per_episode, 0.05)) + 64
    chosen: list[np.ndarray] = []
    remaining = job.n_frauds
    for _ in range(8):
        c_term = rng.integers(0, n_terminals, size=n_cand)
        c_day = rng.integers(job.start_day, job.end_day, size=n_cand)
        c_end = np.minimum(c_day + COMPROMISE_DAYS, job.end_day)
        lo = np.searchsorted(key, c_term * span + (c_day * SECONDS_PER_DAY - t0), side="left")
        hi = np.searchsorted(key, c_term * span + (c_end * SECONDS_PER_DAY - t0), side="left")
        counts = hi - lo
        hit = counts > 0
        lo, counts = lo[hit], counts[hit]
        cum = np.cumsum(counts)
        take = int(np.searchsorted(cum, remaining, side="left")) + 1
        chosen.append(ranges(lo[:take], counts[:take]))
        remaining -= int(cum[min(take, cum.size) - 1]) if cum.size else 0
        if remaining <= 0:
            break
    else:
        logger.warning(
            "compromised_terminal: reached %d of %d target frauds in days [%d, %d)",
            job.n_frauds - remaining,
            job.n_frauds,
            job.start_day,
            job.end_day,
        )
    rows = legit[order[np.unique(np.concatenate(chosen))]]
    scenario[rows] = scenario_id(job.scenario)
    return scenario
