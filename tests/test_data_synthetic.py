"""The synthetic multi-institution transaction generator."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score

from consortium.data import (
    BASE_SCENARIOS,
    FEATURE_NAMES,
    LABEL_DELAY_DAYS,
    SCENARIO_IDS,
    InstitutionProfile,
    ScenarioEvent,
    SpendingDrift,
    SyntheticInstitution,
    default_profiles,
    generate_federation,
    generate_institution,
)
from consortium.data.transaction_features import engineer_features
from consortium.errors import ConfigError

DAY = 86_400.0
N_DAYS = 60


@pytest.fixture(scope="module")
def federation() -> dict[str, SyntheticInstitution]:
    return generate_federation(3, transactions_per_institution=5_000, seed=3, n_days=N_DAYS)


def _profile(name: str = "bank_t", **overrides) -> InstitutionProfile:
    args = {
        "name": name,
        "n_customers": 60,
        "n_terminals": 150,
        "n_transactions": 6_000,
        "fraud_rate": 0.02,
        "scenario_mix": dict.fromkeys(BASE_SCENARIOS, 1.0),
        "terminal_radius": 15.0,
    }
    args.update(overrides)
    return InstitutionProfile(**args)


@pytest.fixture(scope="module")
def rich() -> SyntheticInstitution:
    """One institution with enough fraud of every base scenario."""
    return generate_institution(_profile(), n_days=N_DAYS, seed=11)


# -- shape, determinism, differences ----------------------------------------------------
def test_federation_has_named_institutions_with_shared_finite_features(federation) -> None:
    assert list(federation) == ["bank_a", "bank_b", "bank_c"]
    for name, inst in federation.items():
        ds = inst.dataset
        assert ds.name == name and inst.name == name
        assert ds.feature_names == FEATURE_NAMES and len(FEATURE_NAMES) >= 20
        assert ds.X.dtype == np.float32 and np.isfinite(ds.X).all()
        np.testing.assert_array_equal(ds.y, (inst.scenario > 0).astype(np.int64))
        assert np.all(np.diff(inst.timestamp) >= 0)
        assert inst.timestamp.min() >= 0 and inst.timestamp.max() < N_DAYS * DAY
        np.testing.assert_array_equal(inst.transaction_id, np.arange(ds.n_rows))
        assert inst.customer_id.max() < inst.profile.n_customers
        assert inst.terminal_id.max() < inst.profile.n_terminals


def test_same_seed_is_byte_identical_and_other_seed_differs(federation) -> None:
    again = generate_federation(3, transactions_per_institution=5_000, seed=3, n_days=N_DAYS)
    other = generate_federation(3, transactions_per_institution=5_000, seed=4, n_days=N_DAYS)
    for name, inst in federation.items():
        twin = again[name]
        for field in ("scenario", "timestamp", "customer_id", "terminal_id"):
            assert getattr(inst, field).tobytes() == getattr(twin, field).tobytes()
        assert inst.dataset.X.tobytes() == twin.dataset.X.tobytes()
        diff = other[name]
        assert diff.dataset.n_rows != inst.dataset.n_rows or not np.array_equal(
            diff.dataset.X, inst.dataset.X
        )


def test_institutions_differ_in_volume_fraud_rate_mix_and_spending() -> None:
    profiles = default_profiles(5, seed=0)
    rates = [p.fraud_rate for p in profiles]
    assert all(0.0005 <= r <= 0.02 for r in rates)
    assert max(rates) / min(rates) > 3.0
    sizes = [p.n_transactions for p in profiles]
    assert np.mean(sizes) == pytest.approx(100_000, rel=0.35) and max(sizes) > 1.3 * min(sizes)
    mixes = np.array([[p.scenario_mix[s] for s in BASE_SCENARIOS] for p in profiles])
    assert (mixes >= 0.04).all() and np.ptp(mixes, axis=0).max() > 0.2
    assert all(p.scenario_mix["account_takeover"] == 0 for p in profiles)
    assert len({round(p.spending_scale, 6) for p in profiles}) == 5
    assert default_profiles(5, seed=0) == profiles and len(set(profiles)) == 5
    assert default_profiles(5, seed=1) != profiles


def test_realised_fraud_rates_follow_the_profiles(federation) -> None:
    rates = {}
    for inst in federation.values():
        target = inst.profile.fraud_rate
        realised = inst.dataset.positive_rate
        rates[inst.name] = realised
        if inst.profile.expected_frauds() >= 30:
            assert target / 1.5 <= realised <= target * 1.5
    assert len({round(r, 5) for r in rates.values()}) == 3
    assert max(rates.values()) > 2 * min(rates.values())


@pytest.mark.parametrize("fraud_rate", [0.002, 0.01, 0.02])
def test_fraud_rate_within_factor_of_target(fraud_rate: float) -> None:
    inst = generate_institution(
        _profile(fraud_rate=fraud_rate, n_transactions=20_000, n_customers=150, n_terminals=300),
        n_days=N_DAYS,
        seed=5,
    )
    assert fraud_rate / 1.5 <= inst.dataset.positive_rate <= fraud_rate * 1.5
    assert inst.dataset.n_rows == 20_000


def test_every_base_scenario_is_present_and_labelled(rich) -> None:
    counts = rich.scenario_counts()
    for scenario in BASE_SCENARIOS:
        assert counts[scenario] > 0, counts
    assert counts["account_takeover"] == 0
    assert sum(counts.values()) == rich.dataset.n_rows


def test_scenario_signatures(rich) -> None:
    x, sc = rich.dataset.X, rich.scenario
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    legit = sc == 0
    large = sc == SCENARIO_IDS["large_amount"]
    assert x[large, col["amount"]].min() >= 220 * rich.profile.spending_scale - 0.01
    testing = sc == SCENARIO_IDS["card_testing"]
    assert np.median(x[testing, col["amount"]]) < 3.0
    assert x[testing, col["customer_n_tx_1h"]].mean() > 2 * x[legit, col["customer_n_tx_1h"]].mean()
    burst = sc == SCENARIO_IDS["stolen_card_burst"]
    ratio = col["amount_to_customer_mean_30d"]
    assert np.median(x[burst, ratio]) > np.median(x[legit, ratio])
    compromised = sc == SCENARIO_IDS["compromised_terminal"]
    assert (
        x[compromised, col["terminal_risk_30d"]].mean()
        > 5 * x[legit, col["terminal_risk_30d"]].mean()
    )


# -- features ---------------------------------------------------------------------------
def _reference_features(inst: SyntheticInstitution) -> np.ndarray:
    """Feature windows computed by brute force, one transaction at a time."""
    t, amt = inst.timestamp, inst.dataset.X[:, 0].astype(np.float64)
    cust, term, fraud = inst.customer_id, inst.terminal_id, inst.dataset.y
    n = t.size
    out = {name: np.zeros(n) for name in FEATURE_NAMES}
    order = np.arange(n)
    for i in range(n):
        same_c = (cust == cust[i]) & (order <= i)
        for w, label in ((3600.0, "1h"), (DAY, "1d"), (7 * DAY, "7d"), (30 * DAY, "30d")):
            m = same_c & (t > t[i] - w)
            out[f"customer_n_tx_{label}"][i] = m.sum()
            if label != "1h":
                out[f"customer_mean_amount_{label}"][i] = amt[m].mean()
        prev = np.flatnonzero(same_c & (order < i))
        out["seconds_since_customer_prev_tx"][i] = (
            min(t[i] - t[prev[-1]], 30 * DAY) if prev.size else 30 * DAY
        )
        end = t[i] - LABEL_DELAY_DAYS * DAY
        for days in (1, 7, 30):
            m = (term == term[i]) & (t < end) & (t >= end - days * DAY)
            out[f"terminal_n_tx_{days}d"][i] = m.sum()
            out[f"terminal_risk_{days}d"][i] = fraud[m].mean() if m.any() else 0.0
    return np.column_stack([out[n] for n in FEATURE_NAMES])


def test_window_features_match_brute_force() -> None:
    inst = generate_institution(
        _profile(n_customers=15, n_terminals=12, n_transactions=900, terminal_radius=30.0),
        n_days=N_DAYS,
        seed=2,
    )
    ref = _reference_features(inst)
    checked = [n for n in FEATURE_NAMES if n.startswith(("customer_", "terminal_", "seconds_"))]
    for name in checked:
        j = FEATURE_NAMES.index(name)
        np.testing.assert_allclose(
            inst.dataset.X[:, j], ref[:, j], rtol=1e-5, atol=1e-3, err_msg=name
        )
    assert ref[:, FEATURE_NAMES.index("terminal_risk_30d")].max() > 0


def test_calendar_features_start_on_a_monday() -> None:
    t = np.array([0.0, 5 * DAY + 3 * 3600, 6 * DAY + 23 * 3600, 7 * DAY + 12 * 3600])
    x = engineer_features(
        timestamp=t,
        amount=np.array([1.0, 2.0, 3.0, 4.0]),
        customer_id=np.zeros(4, dtype=np.int64),
        terminal_id=np.zeros(4, dtype=np.int64),
        is_fraud=np.zeros(4),
    )
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    np.testing.assert_array_equal(x[:, col["is_weekend"]], [0, 1, 1, 0])
    np.testing.assert_array_equal(x[:, col["is_night"]], [1, 1, 0, 0])
    np.testing.assert_allclose(x[:, col["log_amount"]], np.log1p([1, 2, 3, 4]), rtol=1e-6)
    np.testing.assert_allclose(
        x[:, col["hour_cos"]], [1, np.cos(np.pi / 4), np.cos(2 * np.pi * 23 / 24), -1], atol=1e-6
    )


def test_terminal_risk_never_uses_fresh_labels() -> None:
    """Labels younger than the delay must not change any feature."""
    inst = generate_institution(_profile(n_transactions=2_000), n_days=N_DAYS, seed=4)

    def features(labels: np.ndarray) -> np.ndarray:
        return engineer_features(
            timestamp=inst.timestamp,
            amount=inst.dataset.X[:, 0],
            customer_id=inst.customer_id,
            terminal_id=inst.terminal_id,
            is_fraud=labels,
        )

    y = inst.dataset.y
    flipped = y.copy()
    late = inst.timestamp > inst.timestamp.max() - LABEL_DELAY_DAYS * DAY
    flipped[late] = 1 - flipped[late]
    np.testing.assert_array_equal(features(flipped), features(y))
    # flipping old labels does change the terminal risk: the check above can fail
    flipped[~late] = 1 - flipped[~late]
    assert not np.array_equal(features(flipped), features(y))


def test_fraud_is_learnable_but_not_trivial(rich) -> None:
    """Train on the first 70 % of days, test on the rest; AUPRC well above the base rate."""
    ds, day = rich.dataset, rich.day
    train = day < int(0.7 * N_DAYS)
    clf = HistGradientBoostingClassifier(max_iter=60, random_state=0)
    clf.fit(ds.X[train], ds.y[train])
    scores = clf.predict_proba(ds.X[~train])[:, 1]
    auprc = average_precision_score(ds.y[~train], scores)
    base = ds.y[~train].mean()
    assert auprc > 5 * base, (auprc, base)
    assert auprc < 0.99, auprc


# -- continual-learning hooks -----------------------------------------------------------
def test_scenario_schedule_restricts_days() -> None:
    inst = generate_institution(
        _profile(), n_days=N_DAYS, seed=1, scenario_schedule={"card_testing": (30, 45)}
    )
    days = inst.day[inst.scenario == SCENARIO_IDS["card_testing"]]
    assert days.size > 0 and days.min() >= 30 and days.max() < 45
    other = inst.day[inst.scenario == SCENARIO_IDS["large_amount"]]
    assert other.min() < 30


def test_extra_scenario_adds_rows_from_its_day_without_changing_others() -> None:
    profile = _profile(fraud_rate=0.005)
    base = generate_institution(profile, n_days=N_DAYS, seed=8)
    event = ScenarioEvent("account_takeover", start_day=40, fraud_rate=0.01)
    new = generate_institution(profile, n_days=N_DAYS, seed=8, extra_scenarios=[event])
    ato = new.scenario == SCENARIO_IDS["account_takeover"]
    assert ato.sum() > 10 and new.day[ato].min() >= 40
    assert base.scenario_counts()["account_takeover"] == 0
    rest = new.select(~ato)
    np.testing.assert_array_equal(rest.timestamp, base.timestamp)
    np.testing.assert_array_equal(rest.scenario, base.scenario)
    np.testing.assert_array_equal(rest.dataset.X[:, 0], base.dataset.X[:, 0])
    hours = (new.timestamp[ato] % DAY) / 3600
    assert hours.max() < 5.0


def test_spending_drift_scales_legit_amounts_from_its_day() -> None:
    profile = _profile(fraud_rate=0.002)
    base = generate_institution(profile, n_days=N_DAYS, seed=9)
    shifted = generate_institution(
        profile, n_days=N_DAYS, seed=9, drift=SpendingDrift(start_day=30, amount_multiplier=2.0)
    )
    np.testing.assert_array_equal(base.timestamp, shifted.timestamp)
    legit = base.scenario == 0
    late = base.day >= 30
    a0, a1 = base.dataset.X[:, 0], shifted.dataset.X[:, 0]
    np.testing.assert_allclose(a1[legit & ~late], a0[legit & ~late])
    np.testing.assert_allclose(a1[legit & late], 2 * a0[legit & late], atol=0.02)


def _mean_legit_amount(inst: SyntheticInstitution, n_customers: int) -> np.ndarray:
    legit = inst.scenario == 0
    cust = inst.customer_id[legit]
    total = np.bincount(cust, weights=inst.dataset.X[legit, 0], minlength=n_customers)
    return total / np.maximum(np.bincount(cust, minlength=n_customers), 1)


def test_consecutive_blocks_share_the_population() -> None:
    profile = _profile(n_transactions=3_000, n_customers=40)
    first = generate_institution(profile, n_days=30, seed=6)
    second = generate_institution(profile, n_days=30, seed=6, start_day=30)
    stranger = generate_institution(profile, n_days=30, seed=7, start_day=30)
    assert first.day.max() < 30 <= second.day.min() and second.day.max() < 60
    assert not np.array_equal(first.customer_id, second.customer_id[: first.dataset.n_rows])
    m1, m2, m3 = (_mean_legit_amount(i, 40) for i in (first, second, stranger))
    # customers keep their spending level across blocks of the same seed
    assert np.corrcoef(m1, m2)[0, 1] > 0.8
    assert np.corrcoef(m1, m3)[0, 1] < 0.5


# -- validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"fraud_rate": 0.5}, "The 'fraud_rate' parameter of InstitutionProfile must be"),
        ({"n_transactions": 10}, "'n_transactions'"),
        ({"scenario_mix": {"phishing": 1.0}}, "unknown scenarios ['phishing']"),
        ({"scenario_mix": {"large_amount": -1.0}}, "non-negative weights"),
        ({"spending_scale": 0.0}, "'spending_scale'"),
        ({"name": "../evil"}, "path-safe"),
    ],
)
def test_profile_validation(overrides: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        _profile(**overrides)
    assert fragment in str(err.value)


def test_generator_option_validation() -> None:
    profile = _profile(scenario_mix={"large_amount": 1.0})
    with pytest.raises(ConfigError, match="extra_scenarios"):
        generate_institution(profile, seed=0, scenario_schedule={"card_testing": (1, 5)})
    with pytest.raises(ConfigError, match="0 <= start_day < end_day"):
        generate_institution(profile, seed=0, scenario_schedule={"large_amount": (5, 1)})
    with pytest.raises(ConfigError, match="'n_days'"):
        generate_institution(profile, seed=0, n_days=0)
    with pytest.raises(ConfigError, match="'end_day'"):
        ScenarioEvent("card_testing", start_day=10, end_day=5)
    with pytest.raises(ConfigError, match="len\\(profiles\\) = 1"):
        generate_federation(2, profiles=[profile])
    with pytest.raises(ConfigError, match="unknown institutions \\['bank_z'\\]"):
        generate_federation(
            1, profiles=[profile], drift={"bank_z": SpendingDrift(start_day=3)}, n_days=10
        )
