"""Synthetic card transactions for a federation of institutions that differ.

The generator follows the simulator of Le Borgne et al., *Reproducible Machine
Learning for Credit Card Fraud Detection — Practical Handbook*: customers with a
home location, mean/spread of amounts and activity; terminals on the same grid;
each customer pays at terminals near home; transactions over ``n_days`` days;
fraud scenarios (see :mod:`consortium.data.scenarios`); and handbook-style
features (see :mod:`consortium.data.transaction_features`).

Institutions are made non-IID on purpose by :func:`default_profiles`: they
differ in volume, fraud rate, scenario mix and customer base.  For
continual-learning experiments a run can switch a scenario on at a known day
(``scenario_schedule`` / ``extra_scenarios``) and shift customers' spending from
a day on (``drift``).

Randomness is split into independent streams derived from ``seed``: the
population (customers, terminals) depends only on ``seed``; legitimate activity
on ``seed`` and ``start_day``; each fraud job on its own stream.  Adding an extra
scenario therefore adds rows without changing any other row, and the same seed
always gives byte-identical arrays.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

import numpy as np

from consortium.data.dataset import Dataset
from consortium.data.naming import check_institution_name, institution_names
from consortium.data.population import Population, make_population
from consortium.data.scenarios import (
    BASE_SCENARIOS,
    SCENARIO_IDS,
    SCENARIOS,
    FraudJob,
    ScenarioEvent,
    adds_rows,
    compromise_terminals,
    inject,
    legit_time_of_day,
    scenario_name,
)
from consortium.data.transaction_features import FEATURE_NAMES, SECONDS_PER_DAY, engineer_features
from consortium.data.transaction_table import (
    LEGIT,
    TransactionTable,
    burst_offsets,
    episode_sizes,
)
from consortium.errors import ConfigError, param_error

logger = logging.getLogger(__name__)

MIN_FRAUD_RATE = 0.0005
MAX_FRAUD_RATE = 0.02
BIG_TICKET_SHARE = 0.003
"""Share of legitimate purchases that are big-ticket (4-10x the customer's mean)."""
MICRO_SESSION_SHARE = 0.01
"""Share of legitimate rows inside short sessions of small payments (transit, vending)."""
WEEKEND_ACTIVITY = 0.8
"""Relative legitimate activity on Saturdays and Sundays."""
TARGET_NEIGHBOURHOOD = 10.0
"""Default profiles choose the terminal radius so a customer has this many terminals nearby."""

_STREAM_POPULATION = 0
_STREAM_LEGIT = 1
_STREAM_DRIFT = 2
_STREAM_FRAUD = 3


def _is_int(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _equal_base_mix() -> dict[str, float]:
    return {s: 1.0 / len(BASE_SCENARIOS) for s in BASE_SCENARIOS}


@dataclass(frozen=True)
class InstitutionProfile:
    """What one simulated institution looks like.

    Parameters
    ----------
    name : str
        Institution name (path-safe, e.g. ``"bank_a"``).
    n_customers, n_terminals : int
        Sizes of the customer base and the terminal network (>= 1).
    n_transactions : int
        Target number of transactions (legitimate + fraud) over the generated
        period (>= 100); extra scenario events add rows on top.
    fraud_rate : float
        Target share of fraudulent transactions, in [0.0005, 0.02].
    scenario_mix : Mapping[str, float]
        Non-negative weights over :data:`~consortium.data.scenarios.SCENARIOS`
        (missing scenarios weigh 0); stored normalised to sum 1 over all scenarios.
    spending_scale : float
        Multiplier of customers' mean amounts (> 0).
    activity_dispersion : float
        Sigma of customers' log-normal relative activity (>= 0).
    terminal_radius : float
        Customers pay at terminals within this distance of home (grid 100 x 100).
    """

    name: str
    n_customers: int
    n_terminals: int
    n_transactions: int
    fraud_rate: float = 0.005
    scenario_mix: Mapping[str, float] = field(default_factory=_equal_base_mix)
    spending_scale: float = 1.0
    activity_dispersion: float = 0.5
    terminal_radius: float = 5.0

    def __post_init__(self) -> None:
        owner = "InstitutionProfile"
        check_institution_name(self.name, owner=owner)
        for name, low in (("n_customers", 1), ("n_terminals", 1), ("n_transactions", 100)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise param_error(name, owner, f"an int >= {low}", value)
        if not _is_real(self.fraud_rate) or not MIN_FRAUD_RATE <= self.fraud_rate <= MAX_FRAUD_RATE:
            raise param_error(
                "fraud_rate",
                owner,
                f"a float in [{MIN_FRAUD_RATE}, {MAX_FRAUD_RATE}]",
                self.fraud_rate,
            )
        for name, positive in (
            ("spending_scale", True),
            ("activity_dispersion", False),
            ("terminal_radius", True),
        ):
            value = getattr(self, name)
            ok = (
                _is_real(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
            )
            if not ok:
                raise param_error(
                    name, owner, "a finite float " + ("> 0" if positive else ">= 0"), value
                )
        object.__setattr__(self, "scenario_mix", self._normalised_mix())

    def _normalised_mix(self) -> dict[str, float]:
        mix = self.scenario_mix
        if not isinstance(mix, Mapping):
            raise param_error(
                "scenario_mix", "InstitutionProfile", "a mapping scenario -> weight", mix
            )
        unknown = [k for k in mix if k not in SCENARIO_IDS]
        if unknown:
            raise param_error(
                "scenario_mix",
                "InstitutionProfile",
                f"a mapping with keys among {list(SCENARIOS)}",
                f"unknown scenarios {unknown}",
            )
        bad = {k: v for k, v in mix.items() if not _is_real(v) or not math.isfinite(v) or v < 0}
        total = sum(float(v) for v in mix.values()) if not bad else 0.0
        if bad or total <= 0:
            raise param_error(
                "scenario_mix",
                "InstitutionProfile",
                "finite non-negative weights with a positive sum",
                dict(mix),
            )
        return {s: float(mix.get(s, 0.0)) / total for s in SCENARIOS}

    def __hash__(self) -> int:
        mix = tuple(sorted(self.scenario_mix.items()))
        return hash(
            (
                self.name,
                self.n_customers,
                self.n_terminals,
                self.n_transactions,
                self.fraud_rate,
                mix,
                self.spending_scale,
                self.activity_dispersion,
                self.terminal_radius,
            )
        )

    def expected_frauds(self) -> int:
        """Target number of fraudulent rows over the whole period (without extras)."""
        return int(round(self.fraud_rate * self.n_transactions))


@dataclass(frozen=True)
class SpendingDrift:
    """A shift of customers' legitimate spending from a known day on.

    Parameters
    ----------
    start_day : int
        First (absolute) day with shifted amounts.
    amount_multiplier : float
        Legitimate amounts of affected customers are multiplied by this (> 0).
    customer_share : float
        Share of customers affected, in (0, 1]; the same customers for every
        ``start_day`` block generated with the same seed.
    """

    start_day: int
    amount_multiplier: float = 1.5
    customer_share: float = 1.0

    def __post_init__(self) -> None:
        if not _is_int(self.start_day) or self.start_day < 0:
            raise param_error("start_day", "SpendingDrift", "an int >= 0", self.start_day)
        m = self.amount_multiplier
        if not _is_real(m) or not math.isfinite(m) or m <= 0:
            raise param_error("amount_multiplier", "SpendingDrift", "a finite float > 0", m)
        s = self.customer_share
        if not _is_real(s) or not 0.0 < s <= 1.0:
            raise param_error("customer_share", "SpendingDrift", "a float in (0, 1]", s)


@dataclass(frozen=True, eq=False, repr=False)
class SyntheticInstitution:
    """One institution's generated transactions, features and ground truth.

    All arrays are aligned with ``dataset`` rows, which are in time order.

    Attributes
    ----------
    dataset : Dataset
        Engineered features (:data:`FEATURE_NAMES`) and fraud labels.
    scenario : numpy.ndarray
        int64 scenario id per row (0 = legitimate; see ``SCENARIO_IDS``).
    timestamp : numpy.ndarray
        float64 seconds since the simulation epoch (day 0 is a Monday).
    customer_id, terminal_id, transaction_id : numpy.ndarray
        int64 ids; transaction ids are 0..n-1 in time order within this block.
    profile : InstitutionProfile
        The profile the data was generated from.
    """

    dataset: Dataset
    scenario: np.ndarray
    timestamp: np.ndarray
    customer_id: np.ndarray
    terminal_id: np.ndarray
    transaction_id: np.ndarray
    profile: InstitutionProfile

    def __post_init__(self) -> None:
        n = self.dataset.n_rows
        for name in ("scenario", "timestamp", "customer_id", "terminal_id", "transaction_id"):
            if np.shape(getattr(self, name)) != (n,):
                raise ConfigError(
                    f"SyntheticInstitution '{self.dataset.name}': '{name}' must have shape ({n},); "
                    f"got {np.shape(getattr(self, name))}."
                )

    @property
    def name(self) -> str:
        """The institution's name."""
        return self.dataset.name

    @property
    def day(self) -> np.ndarray:
        """int64 absolute day of every row."""
        return np.floor(self.timestamp / SECONDS_PER_DAY).astype(np.int64)

    def scenario_counts(self) -> dict[str, int]:
        """Number of rows per scenario name, including ``"legit"``."""
        counts = np.bincount(self.scenario, minlength=len(SCENARIOS) + 1)
        return {scenario_name(i): int(c) for i, c in enumerate(counts)}

    def select(self, idx: np.ndarray) -> SyntheticInstitution:
        """The rows at ``idx`` (integer indices or boolean mask), all arrays aligned."""
        sel = (
            np.flatnonzero(idx)
            if np.asarray(idx).dtype == bool
            else np.asarray(idx, dtype=np.int64)
        )
        return SyntheticInstitution(
            dataset=self.dataset.subset(sel),
            scenario=self.scenario[sel],
            timestamp=self.timestamp[sel],
            customer_id=self.customer_id[sel],
            terminal_id=self.terminal_id[sel],
            transaction_id=self.transaction_id[sel],
            profile=self.profile,
        )

    def between_days(self, start_day: int, end_day: int) -> SyntheticInstitution:
        """The rows whose absolute day is in ``[start_day, end_day)``."""
        day = self.day
        return self.select((day >= start_day) & (day < end_day))

    def __repr__(self) -> str:
        return (
            f"SyntheticInstitution(name={self.name!r}, n_rows={self.dataset.n_rows}, "
            f"fraud_rate={self.dataset.positive_rate:.4g})"
        )


# -- profiles ---------------------------------------------------------------------------
def default_profiles(
    n_institutions: int,
    *,
    seed: int,
    mean_transactions: int = 100_000,
    n_days: int = 120,
) -> list[InstitutionProfile]:
    """Profiles of ``n_institutions`` deliberately different institutions.

    Institutions differ in

    * volume: transaction counts are log-normal around ``mean_transactions``
      (between 0.25x and 3x);
    * fraud rate: spread over [0.05 %, 2 %] on a log scale (one institution per
      stratum, in random order), so rates always differ;
    * scenario mix: Dirichlet(1) weights over the four base scenarios, each at
      least 5 % (``account_takeover`` is kept out, for use as a *new* scenario);
    * customer base: spending scale (log-normal), transactions per customer and
      day (0.8-3), activity dispersion, terminals per customer.

    Parameters
    ----------
    n_institutions : int
        Number of profiles (>= 1), named ``bank_a``, ``bank_b``, ...
    seed : int
        Seed; the same seed gives the same profiles.
    mean_transactions : int
        Mean of the institutions' transaction counts (>= 100).
    n_days : int
        Period the profiles are sized for (sets customers from volume).

    Returns
    -------
    list of InstitutionProfile
        One profile per institution.
    """
    owner = "default_profiles"
    if not _is_int(n_institutions) or n_institutions < 1:
        raise param_error("n_institutions", owner, "an int >= 1", n_institutions)
    if not _is_int(seed) or seed < 0:
        raise param_error("seed", owner, "an int >= 0", seed)
    if not _is_int(mean_transactions) or mean_transactions < 100:
        raise param_error("mean_transactions", owner, "an int >= 100", mean_transactions)
    if not _is_int(n_days) or n_days < 1:
        raise param_error("n_days", owner, "an int >= 1", n_days)
    rng = np.random.default_rng([seed, 7])
    strata = (rng.permutation(n_institutions) + rng.random(n_institutions)) / n_institutions
    log_lo, log_hi = math.log(MIN_FRAUD_RATE), math.log(MAX_FRAUD_RATE)
    rates = np.exp(log_lo + strata * (log_hi - log_lo))
    volume = rng.lognormal(0.0, 0.5, size=n_institutions)
    volume = np.clip(volume / volume.mean(), 0.25, 3.0)
    profiles = []
    for i, name in enumerate(institution_names(n_institutions)):
        r = np.random.default_rng([seed, 11, i])
        mix = np.maximum(r.dirichlet(np.ones(len(BASE_SCENARIOS))), 0.05)
        mix /= mix.sum()
        n_tx = max(100, int(round(mean_transactions * volume[i])))
        per_customer_day = r.uniform(0.8, 3.0)
        n_customers = max(20, int(round(n_tx / (n_days * per_customer_day))))
        n_terminals = max(20, int(round(n_customers * r.uniform(1.5, 3.0))))
        radius = 100.0 * math.sqrt(TARGET_NEIGHBOURHOOD / (math.pi * n_terminals))
        profiles.append(
            InstitutionProfile(
                name=name,
                n_customers=n_customers,
                n_terminals=n_terminals,
                n_transactions=n_tx,
                fraud_rate=float(np.clip(rates[i], MIN_FRAUD_RATE, MAX_FRAUD_RATE)),
                scenario_mix={s: float(w) for s, w in zip(BASE_SCENARIOS, mix, strict=True)},
                spending_scale=float(np.clip(r.lognormal(0.0, 0.35), 0.4, 2.5)),
                activity_dispersion=float(r.uniform(0.3, 0.9)),
                terminal_radius=radius,
            )
        )
    return profiles


# -- one institution --------------------------------------------------------------------
def _check_schedule(
    schedule: Mapping[str, tuple[int, int]], profile: InstitutionProfile
) -> dict[str, tuple[int, int]]:
    owner = "generate_institution"
    if not isinstance(schedule, Mapping):
        raise param_error(
            "scenario_schedule", owner, "a mapping scenario -> (start_day, end_day)", schedule
        )
    out: dict[str, tuple[int, int]] = {}
    for s, window in schedule.items():
        if s not in SCENARIO_IDS:
            raise param_error("scenario_schedule", owner, f"keys among {list(SCENARIOS)}", s)
        if profile.scenario_mix[s] <= 0:
            raise param_error(
                "scenario_schedule",
                owner,
                f"scenarios with a positive weight in the scenario_mix of '{profile.name}' "
                "(add new scenarios with extra_scenarios)",
                s,
            )
        ok = (
            isinstance(window, tuple | list)
            and len(window) == 2
            and all(_is_int(v) for v in window)
            and 0 <= window[0] < window[1]
        )
        if not ok:
            raise param_error(
                "scenario_schedule",
                owner,
                "(start_day, end_day) int pairs with 0 <= start_day < end_day",
                {s: window},
            )
        out[s] = (int(window[0]), int(window[1]))
    return out


def _fraud_jobs(
    profile: InstitutionProfile,
    *,
    n_days: int,
    start_day: int,
    schedule: Mapping[str, tuple[int, int]],
    extras: Sequence[ScenarioEvent],
) -> list[tuple[FraudJob, int]]:
    """Fraud jobs with a stream tag each (0 for the profile's mix, i+1 for extra i)."""
    end_day = start_day + n_days
    jobs: list[tuple[FraudJob, int]] = []
    total = profile.fraud_rate * profile.n_transactions
    for s in SCENARIOS:
        weight = profile.scenario_mix[s]
        if weight <= 0:
            continue
        lo, hi = schedule.get(s, (start_day, end_day))
        lo, hi = max(lo, start_day), min(hi, end_day)
        if hi <= lo:
            logger.info(
                "%s: scenario %s scheduled outside days [%d, %d)",
                profile.name,
                s,
                start_day,
                end_day,
            )
            continue
        n = max(1, int(round(total * weight * (hi - lo) / n_days)))
        jobs.append((FraudJob(s, n, lo, hi), 0))
    for i, event in enumerate(extras):
        lo = max(event.start_day, start_day)
        hi = min(event.end_day if event.end_day is not None else end_day, end_day)
        if hi <= lo:
            continue
        n = max(1, int(round(event.fraud_rate * profile.n_transactions * (hi - lo) / n_days)))
        jobs.append((FraudJob(event.scenario, n, lo, hi), i + 1))
    return jobs


def _legit_activity(
    pop: Population, *, n_rows: int, n_days: int, start_day: int, rng: np.random.Generator
) -> TransactionTable:
    """Legitimate transactions: regular purchases plus short micro-payment sessions."""
    n_session = int(round(MICRO_SESSION_SHARE * n_rows))
    n_regular = n_rows - n_session
    days = np.arange(start_day, start_day + n_days)
    day_weight = np.where(np.mod(days, 7) >= 5, WEEKEND_ACTIVITY, 1.0)
    day_weight /= day_weight.sum()

    cust = rng.choice(pop.n_customers, size=n_regular, p=pop.activity)
    day = rng.choice(days, size=n_regular, p=day_weight)
    t = day * SECONDS_PER_DAY + legit_time_of_day(n_regular, rng)
    term = pop.home_terminals(cust, rng)
    mean, std = pop.mean_amount[cust], pop.std_amount[cust]
    amount = rng.normal(mean, std)
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    big = rng.random(n_regular) < BIG_TICKET_SHARE
    amount[big] = mean[big] * rng.uniform(4.0, 10.0, size=int(big.sum()))
    regular = TransactionTable(cust, term, t, amount, np.zeros(n_regular, dtype=np.int64))

    sizes = episode_sizes(n_session, 3, 6, rng)
    s_cust = rng.choice(pop.n_customers, size=sizes.size, p=pop.activity)
    s_day = rng.choice(days, size=sizes.size, p=day_weight)
    s_start = s_day * SECONDS_PER_DAY + legit_time_of_day(sizes.size, rng)
    s_t = np.repeat(s_start, sizes) + burst_offsets(sizes, 240.0, rng)
    s_t = np.minimum(s_t, (start_day + n_days) * SECONDS_PER_DAY - 1.0)
    s_term = np.repeat(pop.home_terminals(s_cust, rng), sizes)
    s_amount = rng.uniform(0.5, 6.0, size=int(sizes.sum()))
    sessions = TransactionTable(
        np.repeat(s_cust, sizes), s_term, s_t, s_amount, np.zeros(s_t.size, dtype=np.int64)
    )
    return TransactionTable.stack([regular, sessions])


def _apply_drift(
    table: TransactionTable, drift: SpendingDrift, *, n_customers: int, seed: int
) -> TransactionTable:
    affected = (
        np.random.default_rng([seed, _STREAM_DRIFT]).random(n_customers) < drift.customer_share
    )
    shift = affected[table.customer] & (table.timestamp >= drift.start_day * SECONDS_PER_DAY)
    return table.with_amount(np.where(shift, table.amount * drift.amount_multiplier, table.amount))


def _check_int(value: object, name: str, low: int) -> int:
    if not _is_int(value) or value < low:
        raise param_error(name, "generate_institution", f"an int >= {low}", value)
    return int(value)


def generate_institution(
    profile: InstitutionProfile,
    *,
    n_days: int = 120,
    seed: int,
    start_day: int = 0,
    scenario_schedule: Mapping[str, tuple[int, int]] | None = None,
    extra_scenarios: Sequence[ScenarioEvent] = (),
    drift: SpendingDrift | None = None,
) -> SyntheticInstitution:
    """Simulate one institution's transactions and engineer their features.

    Parameters
    ----------
    profile : InstitutionProfile
        Sizes, fraud rate, scenario mix and customer base.
    n_days : int
        Length of the period (>= 1).
    seed : int
        Seed (>= 0); the same arguments always give byte-identical output.
    start_day : int
        First absolute day of the period (day 0 is a Monday).  The population
        depends only on the seed, so consecutive blocks (``start_day=0`` then
        ``start_day=n_days``) share customers and terminals.
    scenario_schedule : Mapping[str, tuple[int, int]], optional
        Restrict scenarios of the profile's mix to absolute days
        ``[start_day, end_day)``; their intensity inside the window stays that of
        the profile (fewer frauds in total).
    extra_scenarios : sequence of ScenarioEvent
        Additional scenarios (e.g. a new attack from day 60) whose frauds are added
        on top of the profile's transactions.
    drift : SpendingDrift, optional
        Multiply legitimate amounts of (some) customers from a day on.

    Returns
    -------
    SyntheticInstitution
        Dataset (named after the profile) plus scenario, timestamp and id arrays.

    Raises
    ------
    ConfigError
        If an argument is invalid.
    """
    owner = "generate_institution"
    if not isinstance(profile, InstitutionProfile):
        raise param_error("profile", owner, "an InstitutionProfile", type(profile).__name__)
    n_days = _check_int(n_days, "n_days", 1)
    seed = _check_int(seed, "seed", 0)
    start_day = _check_int(start_day, "start_day", 0)
    schedule = _check_schedule(scenario_schedule or {}, profile)
    extras = tuple(extra_scenarios)
    if not all(isinstance(e, ScenarioEvent) for e in extras):
        raise param_error("extra_scenarios", owner, "a sequence of ScenarioEvent", extra_scenarios)
    if drift is not None and not isinstance(drift, SpendingDrift):
        raise param_error("drift", owner, "a SpendingDrift or None", drift)

    started = time.perf_counter()
    jobs = _fraud_jobs(
        profile, n_days=n_days, start_day=start_day, schedule=schedule, extras=extras
    )
    pop = make_population(
        n_customers=profile.n_customers,
        n_terminals=profile.n_terminals,
        spending_scale=profile.spending_scale,
        activity_dispersion=profile.activity_dispersion,
        terminal_radius=profile.terminal_radius,
        rng=np.random.default_rng([seed, _STREAM_POPULATION]),
    )
    n_injected = sum(job.n_frauds for job, tag in jobs if tag == 0 and adds_rows(job.scenario))
    table = _legit_activity(
        pop,
        n_rows=profile.n_transactions - n_injected,
        n_days=n_days,
        start_day=start_day,
        rng=np.random.default_rng([seed, _STREAM_LEGIT, start_day]),
    )
    if drift is not None:
        table = _apply_drift(table, drift, n_customers=pop.n_customers, seed=seed)

    pieces = []
    for job, tag in jobs:
        rng = np.random.default_rng(
            [seed, _STREAM_FRAUD, start_day, SCENARIO_IDS[job.scenario], tag]
        )
        if adds_rows(job.scenario):
            pieces.append(inject(job, pop, spending_scale=profile.spending_scale, rng=rng))
        else:
            table = table.with_scenario(
                compromise_terminals(table, job, n_terminals=pop.n_terminals, rng=rng)
            )
    table = TransactionTable.stack([table, *pieces]).sorted_by_time()
    table = table.with_amount(np.maximum(np.round(table.amount, 2), 0.01))

    features = engineer_features(
        timestamp=table.timestamp,
        amount=table.amount,
        customer_id=table.customer,
        terminal_id=table.terminal,
        is_fraud=table.scenario != LEGIT,
    )
    dataset = Dataset(
        X=features,
        y=(table.scenario != LEGIT).astype(np.int64),
        feature_names=FEATURE_NAMES,
        name=profile.name,
    )
    result = SyntheticInstitution(
        dataset=dataset,
        scenario=table.scenario,
        timestamp=table.timestamp,
        customer_id=table.customer,
        terminal_id=table.terminal,
        transaction_id=np.arange(table.n_rows, dtype=np.int64),
        profile=profile,
    )
    logger.debug(
        "generated %s: %d rows, fraud rate %.4f (target %.4f), %s, %.2fs",
        profile.name,
        dataset.n_rows,
        dataset.positive_rate,
        profile.fraud_rate,
        result.scenario_counts(),
        time.perf_counter() - started,
    )
    return result


# -- a federation -----------------------------------------------------------------------
def _institution_seed(seed: int, name: str) -> int:
    """A per-institution seed that depends on the name, not on the position."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]).generate_state(1)
    return int(state[0])


_T = TypeVar("_T")


def _per_institution(
    value: Mapping[str, _T] | None, names: list[str], param: str
) -> Mapping[str, _T]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise param_error(
            param, "generate_federation", "a mapping institution name -> option", value
        )
    unknown = [k for k in value if k not in names]
    if unknown:
        raise param_error(
            param,
            "generate_federation",
            f"a mapping with keys among {names}",
            f"unknown institutions {unknown}",
        )
    return value


def generate_federation(
    n_institutions: int = 5,
    *,
    transactions_per_institution: int = 100_000,
    seed: int = 0,
    n_days: int = 120,
    profiles: Sequence[InstitutionProfile] | None = None,
    scenario_schedule: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
    extra_scenarios: Mapping[str, Sequence[ScenarioEvent]] | None = None,
    drift: Mapping[str, SpendingDrift] | None = None,
) -> dict[str, SyntheticInstitution]:
    """Simulate a non-IID federation of institutions.

    Parameters
    ----------
    n_institutions : int
        Number of institutions (>= 1); must equal ``len(profiles)`` if given.
    transactions_per_institution : int
        Mean transactions per institution for :func:`default_profiles`
        (ignored when ``profiles`` is given).
    seed : int
        Seed; the same seed gives byte-identical arrays.
    n_days : int
        Length of the simulated period.
    profiles : sequence of InstitutionProfile, optional
        Explicit profiles; defaults to ``default_profiles(n_institutions, seed=seed)``.
    scenario_schedule, extra_scenarios, drift : Mapping, optional
        Per-institution options of :func:`generate_institution`, keyed by name.

    Returns
    -------
    dict
        Institution name -> :class:`SyntheticInstitution`, in profile order.  All
        datasets share :data:`FEATURE_NAMES`.
    """
    owner = "generate_federation"
    if not _is_int(n_institutions) or n_institutions < 1:
        raise param_error("n_institutions", owner, "an int >= 1", n_institutions)
    if not _is_int(seed) or seed < 0:
        raise param_error("seed", owner, "an int >= 0", seed)
    if profiles is None:
        profiles = default_profiles(
            n_institutions, seed=seed, mean_transactions=transactions_per_institution, n_days=n_days
        )
    profiles = list(profiles)
    if not all(isinstance(p, InstitutionProfile) for p in profiles):
        raise param_error("profiles", owner, "a sequence of InstitutionProfile", profiles)
    if len(profiles) != n_institutions:
        raise param_error(
            "n_institutions", owner, f"len(profiles) = {len(profiles)}", n_institutions
        )
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise param_error("profiles", owner, "profiles with unique names", names)
    schedules = _per_institution(scenario_schedule, names, "scenario_schedule")
    extras = _per_institution(extra_scenarios, names, "extra_scenarios")
    drifts = _per_institution(drift, names, "drift")
    started = time.perf_counter()
    out = {
        p.name: generate_institution(
            p,
            n_days=n_days,
            seed=_institution_seed(seed, p.name),
            scenario_schedule=schedules.get(p.name),
            extra_scenarios=extras.get(p.name, ()),
            drift=drifts.get(p.name),
        )
        for p in profiles
    }
    logger.info(
        "generated %d institutions, %d rows in %.1fs",
        len(out),
        sum(s.dataset.n_rows for s in out.values()),
        time.perf_counter() - started,
    )
    return out
