"""Record-level DP-SGD with noise shares under secure aggregation (``dpsgd-secagg``) through the real Coordinator.

The Coordinator drives the real ClientApp (with the institutions' secure-aggregation
mod) behind the in-process Grid.  With sampling rate 1 an institution's clipped
contribution is deterministic, so the test recomputes it independently (per-row
gradients, class-aware clipping, ``/ q·N``) and checks that the unmasked sum is that
plus noise of exactly the accounted variance.  ε is checked against
``dp_accounting`` called directly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dp_accounting import dp_event as dpe
from dp_accounting.pld import pld_privacy_accountant

from consortium.cli import main
from consortium.data import Dataset, federate_institutions, save_split
from consortium.errors import ConfigError
from consortium.federation.client_app import build_client_app, institution_secagg_mod
from consortium.federation.config import FederationConfig
from consortium.federation.coordinator import Coordinator
from consortium.federation.secure_transport import SecureTransport
from consortium.models import Standardizer, build_model, get_parameters, predict_scores, set_parameters
from consortium.privacy.dpsgd import clip_and_sum, per_row_gradients
from consortium.privacy.dpsgd_secagg_run import DATA_BOUND_CLIPS, SecAggDpSgdRunPrivacy, rounding_tv
from consortium.privacy.ledger import PrivacyBudgetError, PrivacyLedger
from consortium.registry import RunStore
from consortium.secagg.inprocess import InProcessGrid

NODES = [101, 202, 303]
HIDDEN = (16,)
"""401 parameters: the noise's standard deviation is estimated to about 3.5 %."""
SIGMA, CLIP, DELTA, STATS_SIGMA = 0.8, 1.0, 1e-5, 30.0


@pytest.fixture(scope="module")
def institutions(three_banks: dict[str, Any]) -> dict[str, Any]:
    """The shared three banks (conftest); their node ids are NODES."""
    assert list(three_banks["dirs"]) == NODES
    return three_banks


class Recording(SecureTransport):
    """The secure transport, keeping exactly what the coordinator unmasked (before its privacy step)."""

    def __init__(self) -> None:
        self.sums: list[Any] = []

    def sum_updates(self, grid, **kw):  # type: ignore[no-untyped-def]
        agg = super().sum_updates(grid, **kw)
        self.sums.append(agg)
        return agg


def _config(tmp_path: Path, **kw: Any) -> FederationConfig:
    base = FederationConfig(
        num_rounds=1, min_nodes=2, round_timeout=5.0, secure_aggregation=True, hidden=HIDDEN,
        store_url=f"sqlite:///{tmp_path}/runs.db", dp="dpsgd-secagg", dp_noise_multiplier=SIGMA, dp_clip=CLIP,
        dp_sampling_rate=1.0, dp_local_steps=1, dp_lr=0.5, delta=DELTA, seed=1,
    )
    return dataclasses.replace(base, **kw)


def _run(cfg: FederationConfig, dirs: dict[int, dict[str, str]], *, policy: Any = None,
         transport: Recording | None = None):  # type: ignore[no-untyped-def]
    grid = InProcessGrid(build_client_app(disclose_eval_default=True, mods=[institution_secagg_mod]),
                         node_ids=list(dirs), node_configs=dirs, policy=policy)
    store = RunStore(cfg.store_url)
    return Coordinator(cfg, store=store, transport=transport), grid, store


def _flat(arrays: Any) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def _clean_contribution(model: torch.nn.Module, X: np.ndarray, y: np.ndarray, *, ratio: float,  # noqa: N803
                        expected_batch: float) -> np.ndarray:
    """One institution's clipped gradient sum over all its rows (q = 1) at ``model``, / q·N: no noise."""
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    xs = torch.as_tensor(X, dtype=torch.float32)
    ys = torch.as_tensor(y, dtype=torch.float32)
    bound = torch.where(ys > 0.5, torch.tensor(CLIP), torch.tensor(CLIP * ratio))
    summed, _ = clip_and_sum(per_row_gradients(model)(params, xs, ys), bound)
    return _flat([summed[k].numpy() for k, _ in model.named_parameters()]) / expected_batch


def _pld(events: list[tuple[dpe.DpEvent, int]]) -> float:
    """ε at DELTA of the composed events, by dp_accounting's PLD accountant called directly."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for event, count in events:
        acc.compose(event, count)
    return float(acc.get_epsilon(DELTA))


STATS = (dpe.GaussianDpEvent(STATS_SIGMA), 4)


def _check_round(result: Any, store: RunStore, recording: Recording, split: Any, *, survivors: list[str]) -> None:
    """The unmasked sum = the survivors' clean contributions + noise σ·sqrt(s/3)·C/(q·N); the model moved by it."""
    statement = result.extra["privacy"]
    params = statement["params"]
    batch, ratio = params["expected_batch"], params["negative_clip_ratio"]
    model = build_model("mlp", split.institutions[0].train.n_features, hidden=HIDDEN, seed=1)
    init = _flat(get_parameters(model))
    std: Standardizer = result.standardizer
    clean = {}
    for inst in split.institutions:
        c = _clean_contribution(model, std.transform(inst.train.X), inst.train.y, ratio=ratio, expected_batch=batch)
        assert np.linalg.norm(c) < DATA_BOUND_CLIPS * CLIP  # the node's projection did not bind
        clean[inst.name] = c
    (agg,) = recording.sums
    assert sorted(agg.participants) == sorted(survivors) and agg.weight_total == pytest.approx(len(survivors))
    residual = _flat(agg.update_sum) - np.sum([clean[n] for n in survivors], axis=0)
    expected_std = SIGMA * CLIP * math.sqrt(len(survivors) / 3) / batch
    assert np.std(residual) == pytest.approx(expected_std, rel=0.2)
    assert abs(float(np.mean(residual))) < 4 * expected_std / math.sqrt(residual.size)
    # The coordinator applied the SUM (not a mean): w <- w - dp_lr * sum, the server optimiser at server_lr 1.
    assert np.allclose(_flat(result.params) - init, -0.5 * _flat(agg.update_sum), atol=1e-6)


def test_dpsgd_secagg_sum_is_the_clipped_sum_plus_the_shares_noise_and_is_charged_exactly(
    tmp_path: Path, institutions: dict[str, Any]
) -> None:
    recording = Recording()
    coord, grid, store = _run(_config(tmp_path), institutions["dirs"], transport=recording)
    result = coord.run(grid)
    assert not grid.client_errors
    split = institutions["split"]
    _check_round(result, store, recording, split, survivors=split.names())
    # Ledger: private statistics (round 0) and one full-noise step per institution; q = 1: Gaussian(σ).
    full = _pld([STATS, (dpe.GaussianDpEvent(SIGMA), 1)])
    for inst in split.names():
        charges = PrivacyLedger(store).charges(run_id=result.run_id, institution=inst)
        assert [(c.round, c.mechanism) for c in charges] == [(0, "dpsgd-stats"), (1, "dpsgd-secagg")]
        assert charges[1].params["survivors"] == 3 and charges[1].params["participants"] == 3
        assert charges[1].epsilon == pytest.approx(full, rel=1e-3)
    statement = result.extra["privacy"]
    assert statement["mechanism"] == "dpsgd-secagg" and statement["epsilon"] == pytest.approx(full, rel=1e-3)
    # A coordinator holding one institution's shares removes 1/3 of the noise variance.
    colluding = _pld([STATS, (dpe.GaussianDpEvent(SIGMA * math.sqrt(2 / 3)), 1)])
    assert statement["epsilon_if_one_colludes"] == pytest.approx(colluding, rel=1e-3)
    assert statement["epsilon_if_one_colludes"] > statement["epsilon"]
    assert 0 <= statement["delta_encoding"] < 1e-3 * DELTA
    saved = store.load_checkpoint(result.run_id).extra["privacy"]
    assert saved["mechanism"] == "dpsgd-secagg"
    assert saved["epsilon_if_one_colludes"] == pytest.approx(colluding, rel=1e-3)
    store.close()


def test_dpsgd_secagg_dropout_is_charged_with_the_noise_left(tmp_path: Path, institutions: dict[str, Any]) -> None:
    def policy(node: int, label: str) -> str:
        return "drop" if node == 303 and label == "masked_input" else "deliver"

    recording = Recording()
    # (The node also misses the statistics' masked-input stage: 2-second stages keep the test short.)
    coord, grid, store = _run(_config(tmp_path, round_timeout=2.0), institutions["dirs"], policy=policy,
                              transport=recording)
    result = coord.run(grid)
    split = institutions["split"]
    dropped = institutions["dirs"][303]["institution"]
    assert result.rounds[0].dropped == (dropped,)
    _check_round(result, store, recording, split, survivors=[n for n in split.names() if n != dropped])
    left = _pld([STATS, (dpe.GaussianDpEvent(SIGMA * math.sqrt(2 / 3)), 1)])
    charges = [c for c in PrivacyLedger(store).charges(run_id=result.run_id) if c.round == 1]
    assert sorted(c.institution for c in charges) == sorted(split.names())  # every invited one, dropped too
    for c in charges:
        assert c.params["survivors"] == 2 and c.params["invited"] == 3
        assert c.params["effective_noise_multiplier"] == pytest.approx(SIGMA * math.sqrt(2 / 3))
        assert c.epsilon == pytest.approx(left, rel=3e-3)  # PLD discretisation differs slightly
        assert c.epsilon > _pld([STATS, (dpe.GaussianDpEvent(SIGMA), 1)]) * 1.05
    store.close()


def test_budget_stops_dpsgd_secagg_before_the_round_that_would_exceed_it(
    tmp_path: Path, institutions: dict[str, Any]
) -> None:
    cfg = _config(tmp_path)
    coord, grid, store = _run(cfg, institutions["dirs"])
    first = coord.run(grid)
    store.close()
    # Same data: room for a second statistics release and exactly one more step.
    budget = _pld([(STATS[0], 8), (dpe.GaussianDpEvent(SIGMA), 2)]) * 1.001
    coord, grid, store = _run(dataclasses.replace(cfg, budget_epsilon=budget, num_rounds=3), institutions["dirs"])
    with pytest.raises(PrivacyBudgetError, match=r"spent ε = .* remaining ε = "):
        coord.run(grid)
    (run,) = [r for r in store.list_runs() if r.run_id != first.run_id]
    assert run.status == "failed" and [r.round for r in store.rounds(run.run_id)] == [1]
    charges = PrivacyLedger(store).charges(institution=institutions["split"].names()[0])
    assert [(c.round, c.mechanism) for c in charges] == [(0, "dpsgd-stats"), (1, "dpsgd-secagg")] * 2
    assert charges[-1].epsilon <= budget
    store.close()


def test_bad_dpsgd_secagg_settings_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'secure_aggregation'"):
        _config(tmp_path, secure_aggregation=False)
    with pytest.raises(ConfigError, match="'dp_local_steps'.*one secure round"):
        _config(tmp_path, dp_local_steps=3)
    with pytest.raises(ConfigError, match="'fraction_train'"):
        _config(tmp_path, fraction_train=0.5)
    out = CliRunner().invoke(main, ["simulate", "--institutions", "2", "--transactions", "1000", "--dp",
                                    "dpsgd-secagg", "--no-secure-aggregation", "--dp-noise-multiplier", "1"])
    assert out.exit_code == 2 and "secure_aggregation" in out.output
    out = CliRunner().invoke(main, ["simulate", "--institutions", "2", "--transactions", "1000", "--dp",
                                    "dpsgd-secagg", "--dp-local-steps", "2", "--dp-noise-multiplier", "1"])
    assert out.exit_code == 2 and "dp_local_steps" in out.output
    # 50 institutions with q·N = 7.5e5: a share's noise std is only ~4 integer steps; refused before training.
    store = RunStore(f"sqlite:///{tmp_path}/plan.db")
    with pytest.raises(ConfigError, match="encoding would add δ"):
        SecAggDpSgdRunPrivacy.plan(
            _config(tmp_path, dp_sampling_rate=0.3, dp_noise_multiplier=1.0), store=store,
            data_ids={f"bank_{i}": f"d{i}" for i in range(50)}, rows_per_institution=5e4, positive_rate=0.1,
            reference=[np.zeros(100)],
        )
    store.close()
    # The rounding's total variation: nothing for one share or noise of many steps, large for a coarse encoding.
    assert rounding_tv(0.2, 1) == 0.0 and rounding_tv(50.0, 3) == 0.0
    assert rounding_tv(0.3, 3) == 1.0 and rounding_tv(3.0, 3) < 1e-20 < rounding_tv(1.0, 3) < 1e-2


@pytest.mark.parametrize(("hidden", "power"), [((8,), 0.5), ((), 0.0)], ids=["mlp", "logistic"])
def test_dpsgd_secagg_learns_a_separable_signal(tmp_path: Path, hidden: tuple[int, ...], power: float) -> None:
    """Also with the benchmark's settings: a logistic model (empty hidden) and one clip bound for both classes."""
    rng = np.random.default_rng(3)
    names = ("f0", "f1", "f2", "f3")
    parts = {}
    for i, inst in enumerate(("bank_a", "bank_b", "bank_c")):
        X = rng.normal(size=(500, 4)) + 0.3 * i  # noqa: N806  (shifted institutions: non-IID)
        y = (X[:, 0] + 0.5 * X[:, 1] > 1.0).astype(np.int64)
        parts[inst] = Dataset(X=X, y=y, feature_names=names, name=inst)
    split = federate_institutions(parts, seed=3)
    root = Path(save_split(split, tmp_path / "data"))
    dirs = {node: {"data-path": str(root / n), "institution": n} for node, n in zip(NODES, split.names(), strict=True)}
    cfg = _config(tmp_path, num_rounds=12, dp_sampling_rate=0.3, dp_lr=2.0, dp_noise_multiplier=1.0, hidden=hidden,
                  dp_negative_clip_power=power)
    coord, grid, store = _run(cfg, dirs)
    result = coord.run(grid)
    assert not grid.client_errors
    ratio = result.extra["privacy"]["params"]["negative_clip_ratio"]
    assert ratio == 1.0 if power == 0 else ratio < 0.9
    model = build_model("mlp", 4, hidden=hidden, seed=1)
    set_parameters(model, result.params)
    scores = predict_scores(model, result.standardizer.transform(split.holdout.X))
    pos, neg = scores[split.holdout.y == 1], scores[split.holdout.y == 0]
    auc = float(np.mean(pos[:, None] > neg[None, :]))
    assert pos.mean() > neg.mean() and auc > 0.9, auc
    charges = PrivacyLedger(store).charges(run_id=result.run_id, institution="bank_a")
    assert [c.round for c in charges] == list(range(13))
    q_event = dpe.PoissonSampledDpEvent(0.3, dpe.GaussianDpEvent(1.0))
    assert result.extra["privacy"]["epsilon"] == pytest.approx(_pld([STATS, (q_event, 12)]), rel=1e-3)
    # The signed bundle of this model carries (ε, δ), the mechanisms and their parameters.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from consortium.registry.publish import publish_run_model  # noqa: PLC0415
    from consortium.registry.registry import ModelRegistry  # noqa: PLC0415

    key = Ed25519PrivateKey.generate()
    registry = ModelRegistry(store, tmp_path / "blobs", public_key=key.public_key())
    published = publish_run_model(store, registry=registry, private_key=key, run_id=result.run_id)
    privacy = registry.verify(published.entry.model_version).manifest.privacy
    assert privacy is not None and privacy["epsilon"] == pytest.approx(result.extra["privacy"]["epsilon"])
    assert "dpsgd-secagg" in privacy["mechanism"] and privacy["delta"] == DELTA
    assert privacy["params"]["params"]["noise_multiplier"] == pytest.approx(1.0), privacy["params"]
    store.close()
