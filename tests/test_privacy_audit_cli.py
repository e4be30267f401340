"""``consortium privacy audit RUN``: both attacks' AUC and the empirical ε beside the ledger's ε."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from consortium.cli import main
from consortium.models import TrainConfig, build_model, get_parameters, train_local
from consortium.privacy.ledger import PrivacyLedger
from consortium.privacy.mechanisms import DpSgdMechanism
from consortium.registry import RunStore
from consortium.registry.store import RoundRecord


def _store_overfit_run(tmp_path: Path) -> tuple[str, str, float]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(700, 20)).astype(np.float32)
    y = (X[:, 0] + 2.0 * rng.normal(size=700) > 0).astype(np.int64)
    np.savez(tmp_path / "members.npz", X=X[:200], y=y[:200])
    np.savez(tmp_path / "nonmembers.npz", X=X[200:400], y=y[200:400])
    np.savez(tmp_path / "public.npz", X=X[400:], y=y[400:])
    np.savez(tmp_path / "wrong.npz", X=X[:50, :5], y=y[:50])
    torch.set_num_threads(1)
    model = build_model("mlp", 20, hidden=(64,), seed=0)
    train_local(model, X[:200], y[:200], config=TrainConfig(epochs=100, batch_size=32, lr=3e-3, seed=0))
    url = f"sqlite:///{tmp_path}/runs.db"
    params = get_parameters(model)
    now = datetime.now(UTC)
    mech = DpSgdMechanism(noise_multiplier=1.0, clip_norm=1.0, sampling_rate=0.1, steps_per_round=5)
    with RunStore(url) as store:
        run = store.create_run(name="overfit", config={}, institutions=["bank_a"])
        store.record_round(
            run,
            RoundRecord(round=1, started_at=now, finished_at=now, participants=("bank_a",)),
            checkpoint=[*params, np.zeros(20), np.ones(20)],
            checkpoint_extra={"n_params": len(params), "model": "mlp", "hidden": [64], "feature_names": ["f"] * 20},
        )
        # A (deliberately false) ledger claim: this model was trained without noise.
        charge = PrivacyLedger(store).charge(
            run_id=run,
            institution="bank_a",
            data_id="d",
            round=1,
            mechanism="dpsgd",
            event=mech.round_event(),
            delta=1e-5,
        )
    return url, run, charge.epsilon


def test_privacy_audit_cli_reports_both_attacks_and_epsilon_beside_the_ledger(tmp_path: Path) -> None:
    url, run, eps = _store_overfit_run(tmp_path)
    head = ["privacy", "audit", run, "--store", url, "--members", str(tmp_path / "members.npz")]
    rest = ["--public", str(tmp_path / "public.npz"), "--shadows", "3", "--shadow-epochs", "60"]
    args = [*head, "--nonmembers", str(tmp_path / "nonmembers.npz"), *rest]
    out = CliRunner().invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["auc_loss"] > 0.75 and res["auc_lira"] > 0.7, res
    assert res["epsilon_accountant"] == eps
    text = CliRunner().invoke(main, args).output
    assert "loss-threshold attack AUC" in text and "LiRA (offline) attack AUC" in text and "accountant ε" in text
    bad = CliRunner().invoke(main, [*head, "--nonmembers", str(tmp_path / "wrong.npz"), *rest])
    assert bad.exit_code == 2 and "5 features" in bad.output, bad.output
