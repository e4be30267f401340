"""Continual learning on a drifting synthetic stream: detect, recalibrate, retrain without forgetting.

Stream (``consortium.data.generate_federation``, 5 institutions, seed 0): a new
fraud scenario (``account_takeover``) appears on ``DRIFT_DAY`` at bank_a and
bank_b, and half of bank_c's customers spend 1.6x more from the same day.
bank_d and bank_e stay stationary.  Timeline (days)::

    7 ─ train ─ 70 ─ val/reference ─ 84 ─ stationary monitoring ─ 112 (drift) ─ ... ─ END

A federated MLP is trained on days 7-70 (in-process FedAvg over
``train_local``, validation days 70-84, threshold at 1 % FPR from summed
validation histograms).  Then, day by day, every institution scores its
transactions with its deployed model, its ``DriftMonitor`` tests weekly-sized
windows (feature PSI+KS, score PSI+KS) and joins the labels that arrive
``LABEL_DELAY_DAYS`` later (ADWIN and, separately, Page-Hinkley on the miss and
false-alert streams).  Drift reports feed ``DriftVotes`` (k = 2 institutions),
which triggers retraining.  Four strategies:

(a) static model and threshold;
(b) static model, threshold recalibrated weekly to the institution's reference alert rate;
(c) drift-triggered federated retraining from the current model with rehearsal
    of earlier fraud and a proximal term toward the previous model; the
    trigger opens a retraining episode of ``EPISODE_ROUND_SETS`` weekly round
    sets (labels of the new pattern arrive over time);
(d) the same retraining without rehearsal and proximal term.

Outputs ``benchmarks/results/drift.{json,md,png}``.  Summary keys:
``detection_delay``, ``false_alarms_stationary``, ``auprc_pre_drift``,
``auprc_static_after``, ``auprc_retrained_after``, ``recovery_ratio``,
``old_scenario_recall_drop``, ``unseen_institutions_new_scenario_recall``.

    python benchmarks/drift.py            # full run (~150k transactions per institution)
    python benchmarks/drift.py --quick    # same code path, smaller stream, under a minute
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, environment, parser, write_results  # noqa: E402

from consortium.continual import (  # noqa: E402
    DelayedLabelMonitor,
    DriftMonitor,
    DriftVotes,
    GlobalModel,
    LocalData,
    RehearsalBuffer,
    RetrainConfig,
    ThresholdRecalibrator,
    federated_retrain,
    initial_training,
)
from consortium.data import FEATURE_NAMES, LABEL_DELAY_DAYS, generate_federation  # noqa: E402
from consortium.data.scenarios import SCENARIO_IDS, ScenarioEvent  # noqa: E402
from consortium.data.synthetic import SpendingDrift, SyntheticInstitution  # noqa: E402
from consortium.edge.messages import DriftReport  # noqa: E402
from consortium.models import FeatureStats, evaluate_scores, recall_at_fpr  # noqa: E402

logger = logging.getLogger("drift")

SEED = 0
TRAIN_START, TRAIN_END, REF_END = 7, 70, 84
DRIFT_DAY = 112
NEW = SCENARIO_IDS["account_takeover"]
AFFECTED = ("bank_a", "bank_b")
SHIFTED = "bank_c"
STATIONARY = ("bank_d", "bank_e")
UNSEEN = ("bank_c", "bank_d", "bank_e")
NEW_RATE = 0.01
SPENDING = SpendingDrift(DRIFT_DAY, amount_multiplier=1.6, customer_share=0.5)
RECENT_DAYS = 28
EVAL_DAYS = 28
PROXIMAL_MU = 0.01
REHEARSAL_FRAUD = 1_000
"""Earlier fraud rows each institution keeps for rehearsal (more dilutes the new pattern in short round sets)."""
"""Weight of the proximal term toward the previous model in (c)."""
"""'After the drift' metrics are taken over the last EVAL_DAYS of the horizon."""
EPISODE_ROUND_SETS = 8
VOTE_WINDOW_DAYS = 7
"""A drift vote counts for a week (one weekly window); institutions re-vote while drift persists."""
DAY_S = 86_400.0
STRATEGIES = ("a_static", "b_recalibrated", "c_retrained", "d_retrained_no_antiforgetting")


@dataclass
class Sizes:
    tx_per_120_days: int
    end_day: int
    initial_rounds: int
    retrain_rounds: int
    retrain_epochs: int
    episode_round_sets: int


def sizes(quick: bool) -> Sizes:
    if quick:
        return Sizes(tx_per_120_days=25_000, end_day=154, initial_rounds=3, retrain_rounds=1, retrain_epochs=1,
                     episode_round_sets=3)
    return Sizes(tx_per_120_days=100_000, end_day=189, initial_rounds=10, retrain_rounds=4, retrain_epochs=2,
                 episode_round_sets=EPISODE_ROUND_SETS)


def generate(sz: Sizes, *, unseen_probe: bool) -> dict[str, SyntheticInstitution]:
    """The stream; with ``unseen_probe`` the new scenario also appears at the other institutions (evaluation only)."""
    targets = AFFECTED + (UNSEEN if unseen_probe else ())
    return generate_federation(
        5, transactions_per_institution=int(sz.tx_per_120_days * sz.end_day / 120), seed=SEED, n_days=sz.end_day,
        extra_scenarios={n: [ScenarioEvent("account_takeover", DRIFT_DAY, fraud_rate=NEW_RATE)] for n in targets},
        drift={SHIFTED: SPENDING},
    )


def local_data(inst: SyntheticInstitution, lo: int, hi: int, val_days: int,
               rehearsal: RehearsalBuffer | None = None) -> LocalData:
    train, val = inst.between_days(lo, hi - val_days), inst.between_days(hi - val_days, hi)
    return LocalData(X=train.dataset.X, y=train.dataset.y, X_val=val.dataset.X, y_val=val.dataset.y,
                     rehearsal=rehearsal)


class ListPublisher:
    """Collects the monitor's DriftReport/Event payloads (the benchmark's stand-in for MQTT)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def publish(self, payload: Any) -> None:
        self.messages.append(payload)


@dataclass
class Detection:
    first_day: dict[str, float | None] = field(default_factory=dict)
    alarms_stationary: int = 0
    tests_stationary: int = 0


def _is_stationary(name: str, day: float) -> bool:
    return day < DRIFT_DAY or name in STATIONARY


def run(quick: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    sz = sizes(quick)
    fed = generate(sz, unseen_probe=False)
    probe = generate(sz, unseen_probe=True)
    names = list(fed)
    logger.info("generated %s rows", {n: i.dataset.n_rows for n, i in fed.items()})

    # -- initial federated model ----------------------------------------------------------------
    stats = sum((FeatureStats.from_data(i.between_days(TRAIN_START, TRAIN_END).dataset.X) for i in fed.values()),
                FeatureStats.zeros(len(FEATURE_NAMES)))
    std = stats.standardizer()
    init_data = {n: local_data(i, TRAIN_START, REF_END, REF_END - TRAIN_END) for n, i in fed.items()}
    base_cfg = RetrainConfig(rounds=sz.initial_rounds, local_epochs=1, lr=3e-3, seed=SEED)
    t0 = time.perf_counter()
    static = initial_training(init_data, standardizer=std, config=base_cfg, version="1").model
    train_seconds = time.perf_counter() - t0
    logger.info("initial model in %.1f s, threshold %.4f", train_seconds, static.threshold)

    # -- per-institution edge state -------------------------------------------------------------
    publishers = {n: ListPublisher() for n in names}
    monitors: dict[str, dict[str, DriftMonitor]] = {}
    ref_alert_rate = {}
    for n, inst in fed.items():
        ref = inst.between_days(TRAIN_END, REF_END)
        ref_scores = static.scores(ref.dataset.X)
        ref_alert_rate[n] = float(np.mean(ref_scores >= static.threshold))
        weekly_rows = int(ref.dataset.n_rows / ((REF_END - TRAIN_END) / 7))
        monitors[n] = {}
        for method in ("adwin", "page_hinkley"):
            monitors[n][method] = DriftMonitor(
                ref.dataset.X, ref_scores, feature_names=FEATURE_NAMES, institution=n, agent="edge-1",
                model_version=static.version, window=10 * weekly_rows, threshold=static.threshold,
                labels=DelayedLabelMonitor(method=method), publisher=publishers[n],
            )
    recal = {n: ThresholdRecalibrator(target_alert_rate=max(ref_alert_rate[n], 1e-4), window=50_000, min_rows=500)
             for n in names}
    buffers = {n: RehearsalBuffer(len(FEATURE_NAMES), fraud_capacity=REHEARSAL_FRAUD, legit_capacity=20_000,
                                  legit_sample_rate=0.05, seed=SEED + k) for k, n in enumerate(names)}
    for n, inst in fed.items():  # what each institution knew at deployment
        past = inst.between_days(TRAIN_START, REF_END)
        buffers[n].add(past.dataset.X, past.dataset.y)
    votes = DriftVotes(min_institutions=2, window_s=VOTE_WINDOW_DAYS * DAY_S, cooldown_s=1e12)

    detectors = ("feature_psi_ks", "score_psi_ks", "performance_adwin", "performance_page_hinkley")
    detection = {d: Detection(first_day={n: None for n in names}) for d in detectors}
    deployed: dict[str, GlobalModel] = {s: static for s in STRATEGIES}
    thresholds: dict[str, dict[str, float]] = {s: {n: static.threshold for n in names} for s in STRATEGIES}
    retrain_days: list[int] = []
    trigger_day: int | None = None
    retrain_seconds: dict[str, float] = {"c_retrained": 0.0, "d_retrained_no_antiforgetting": 0.0}
    # day -> strategy -> institution -> (scores, y, scenario, alerts)
    scored: dict[int, dict[str, dict[str, tuple[np.ndarray, ...]]]] = {}
    days = list(range(TRAIN_END + 14, sz.end_day))
    drift_reports: list[dict[str, Any]] = []
    adwin_perf_seen = {n: 0 for n in names}
    ph_perf_seen = {n: 0 for n in names}

    for day in days:
        scored[day] = {s: {} for s in STRATEGIES}
        for n, inst in fed.items():
            rows = inst.between_days(day, day + 1)
            X, y, sc = rows.dataset.X, rows.dataset.y, rows.scenario
            if rows.dataset.n_rows == 0:
                continue
            cache: dict[str, np.ndarray] = {}
            for s in STRATEGIES:
                model = deployed[s]
                if model.version not in cache:
                    cache[model.version] = model.scores(X)
                scores = cache[model.version]
                thr = recal[n].threshold(static.threshold) if s == "b_recalibrated" else thresholds[s][n]
                scored[day][s][n] = (scores, y, sc, scores >= thr)
            s_static = cache[static.version]
            recal[n].observe(s_static)
            clock_day = float(day + 1)
            for method, mon in monitors[n].items():
                mon.clock = lambda d=clock_day: d * DAY_S
                verdicts = mon.observe_batch(X, s_static)
                if (day - days[0]) % 7 == 6:  # day-aligned weekly windows (calendar features stay comparable)
                    v = mon.flush()
                    verdicts += [v] if v is not None else []
                alerted = s_static >= static.threshold
                for tid, s_, a_ in zip(rows.transaction_id.tolist(), s_static.tolist(), alerted.tolist(),
                                       strict=True):
                    mon.record(tid, s_, alerted=a_)
                if method == "adwin":
                    for v in verdicts:
                        for det, res in (("feature_psi_ks", v.features), ("score_psi_ks", v.scores)):
                            fired = res.status == "drift"
                            if _is_stationary(n, day):
                                detection[det].tests_stationary += 1
                                detection[det].alarms_stationary += int(fired)
                            elif fired and detection[det].first_day[n] is None:
                                detection[det].first_day[n] = clock_day - DRIFT_DAY
            # labels of the transactions of LABEL_DELAY_DAYS ago arrive today
            lab = inst.between_days(day - LABEL_DELAY_DAYS, day - LABEL_DELAY_DAYS + 1)
            for method, mon in monitors[n].items():
                for tid, yy in zip(lab.transaction_id.tolist(), lab.dataset.y.tolist(), strict=True):
                    mon.label(tid, yy)
                det = f"performance_{method}"
                count = sum(mon.labels.detections().values())
                seen = adwin_perf_seen if method == "adwin" else ph_perf_seen
                new_alarms = count - seen[n]
                seen[n] = count
                if _is_stationary(n, day - LABEL_DELAY_DAYS):
                    detection[det].tests_stationary += 1
                    detection[det].alarms_stationary += int(new_alarms > 0)
                elif new_alarms > 0 and detection[det].first_day[n] is None:
                    detection[det].first_day[n] = clock_day - DRIFT_DAY
            buffers[n].add(lab.dataset.X, lab.dataset.y)
        # -- weekly threshold recalibration for (b) --------------------------------------------
        if (day - days[0]) % 7 == 6:
            for n in names:
                recal[n].recompute(static.threshold)
        # -- coordinator: drift votes and retraining episodes ----------------------------------
        for n in names:
            msgs, publishers[n].messages = publishers[n].messages, []
            for msg in msgs:
                if isinstance(msg, DriftReport) and msg.status == "drift":
                    drift_reports.append({"day": msg.ts / DAY_S, "institution": n, "agent_detectors": method_of(msg)})
                if isinstance(msg, DriftReport) and trigger_day is None and votes.add(msg) is not None:
                    trigger_day = day + 1
                    logger.info("drift confirmed on day %d at %s", trigger_day, list(votes.decisions[-1].institutions))
        due = trigger_day is not None and len(retrain_days) < sz.episode_round_sets and \
            day + 1 >= trigger_day + 7 * len(retrain_days)
        if due:
            retrain_days.append(day + 1)
            labelled_until = day + 1 - LABEL_DELAY_DAYS
            for s, anti in (("c_retrained", True), ("d_retrained_no_antiforgetting", False)):
                cfg = RetrainConfig(rounds=sz.retrain_rounds, local_epochs=sz.retrain_epochs, lr=3e-3,
                                    proximal_mu=PROXIMAL_MU if anti else 0.0,
                                    rehearsal=anti, seed=SEED + len(retrain_days))
                data = {n: local_data(i, labelled_until - RECENT_DAYS, labelled_until, 7,
                                      buffers[n] if anti else None) for n, i in fed.items()}
                t0 = time.perf_counter()
                res = federated_retrain(data, start=deployed[s], config=cfg, version=f"{s[0]}{len(retrain_days) + 1}")
                retrain_seconds[s] += time.perf_counter() - t0
                deployed[s] = res.model
                thresholds[s] = {n: res.model.threshold for n in names}
            logger.info("day %d: retraining round set %d done", day + 1, len(retrain_days))

    # -- metrics ------------------------------------------------------------------------------
    eval_from = sz.end_day - EVAL_DAYS
    result = evaluate(scored, days, names, eval_from=eval_from, sz=sz)
    unseen = unseen_recall(probe, {s: deployed[s] for s in STRATEGIES}, eval_from=eval_from, end=sz.end_day)
    det_delay = {d: {n: detection[d].first_day[n] for n in (*AFFECTED, SHIFTED)} for d in detectors}
    false_alarms = {d: (detection[d].alarms_stationary / detection[d].tests_stationary
                        if detection[d].tests_stationary else None) for d in detectors}
    fa_detail = {d: {"alarms": detection[d].alarms_stationary, "tests": detection[d].tests_stationary,
                     "unit": "weekly-sized window" if d.startswith(("feature", "score")) else "institution-day"}
                 for d in detectors}
    pre = result["pre_drift"]
    after = result["after"]
    summary = {
        "detection_delay": det_delay,
        "false_alarms_stationary": false_alarms,
        "auprc_pre_drift": pre["auprc_affected_all_fraud"],
        "auprc_static_after": after["a_static"]["auprc_new_affected"],
        "auprc_retrained_after": after["c_retrained"]["auprc_new_affected"],
        "recovery_ratio": after["c_retrained"]["auprc_new_affected"] / pre["auprc_affected_all_fraud"],
        "old_scenario_recall_drop": _rel_drop(after["a_static"]["recall_old_at_1pct_fpr"],
                                              after["c_retrained"]["recall_old_at_1pct_fpr"]),
        "old_scenario_recall_drop_without_antiforgetting": _rel_drop(
            after["a_static"]["recall_old_at_1pct_fpr"],
            after["d_retrained_no_antiforgetting"]["recall_old_at_1pct_fpr"]),
        "unseen_institutions_new_scenario_recall": unseen["c_retrained"]["recall_at_threshold"],
        "unseen_institutions_new_scenario_recall_static": unseen["a_static"]["recall_at_threshold"],
        "precision_static_after": after["a_static"]["precision_macro"],
        "precision_recalibrated_after": after["b_recalibrated"]["precision_macro"],
        "precision_static_after_shifted_institution": after["a_static"]["precision_by_institution"][SHIFTED],
        "precision_recalibrated_after_shifted_institution":
            after["b_recalibrated"]["precision_by_institution"][SHIFTED],
        "trigger_day": trigger_day,
        "trigger_institutions": list(votes.decisions[0].institutions) if votes.decisions else [],
        "retrain_days": retrain_days,
    }
    return {
        "benchmark": "drift",
        "quick": quick,
        "environment": environment(),
        "setup": {"institutions": names, "affected_new_scenario": list(AFFECTED), "spending_shift": SHIFTED,
                  "drift_day": DRIFT_DAY, "end_day": sz.end_day, "new_scenario_rate": NEW_RATE,
                  "spending_multiplier": SPENDING.amount_multiplier, "spending_share": SPENDING.customer_share,
                  "label_delay_days": LABEL_DELAY_DAYS, "recent_days": RECENT_DAYS,
                  "eval_from_day": eval_from,
                  "rows": {n: i.dataset.n_rows for n, i in fed.items()}, **sz.__dict__},
        "summary": summary,
        "false_alarms_detail": fa_detail,
        "pre_drift": pre,
        "after": after,
        "unseen": unseen,
        "weekly": result["weekly"],
        "drift_reports": drift_reports,
        "timing": {"initial_training_s": train_seconds, "retraining_s": retrain_seconds,
                   "total_s": time.perf_counter() - t_start},
        "label_counts": {n: monitors[n]["adwin"].summary()["labels"] for n in names},
    }


def method_of(report: DriftReport) -> str:
    """Which evidence a drift report carries: a performance detector (sent at once), or a window's test."""
    st = report.statistics
    if "feature.n_rows" not in st:
        return "performance"
    return "window: features" if st.get("feature.n_drifted", 0) else "window: scores or performance"


def _rel_drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else math.nan


def _concat(parts: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4)) if parts else ()


def _auprc(y: np.ndarray, s: np.ndarray) -> float:
    return evaluate_scores(y, s).auprc if 0 < y.sum() < y.size else math.nan


def _metrics(parts: list[tuple[np.ndarray, ...]]) -> dict[str, float]:
    s, y, sc, alerts = _concat(parts)
    new = (sc == 0) | (sc == NEW)
    old = sc != NEW
    tp = int((alerts & (y == 1)).sum())
    return {
        "auprc_all": _auprc(y, s),
        "auprc_new": _auprc(y[new], s[new]) if (sc == NEW).any() else math.nan,
        "auprc_old": _auprc(y[old], s[old]),
        "recall_old_at_1pct_fpr": recall_at_fpr(y[old], s[old], max_fpr=0.01) if y[old].any() else math.nan,
        "recall_old_at_threshold": float((alerts[old] & (y[old] == 1)).sum() / max(1, (y[old] == 1).sum())),
        "recall_new_at_threshold": float((alerts & (sc == NEW)).sum() / max(1, (sc == NEW).sum())),
        "precision": tp / int(alerts.sum()) if alerts.any() else math.nan,
        "alerts": int(alerts.sum()),
    }


def evaluate(scored: dict[int, dict[str, dict[str, tuple[np.ndarray, ...]]]], days: list[int], names: list[str],
             *, eval_from: int, sz: Sizes) -> dict[str, Any]:
    pre_days = [d for d in days if d < DRIFT_DAY]
    after_days = [d for d in days if d >= eval_from]
    pre_aff = _metrics([scored[d]["a_static"][n] for d in pre_days for n in AFFECTED if n in scored[d]["a_static"]])
    pre_all = _metrics([scored[d]["a_static"][n] for d in pre_days for n in names if n in scored[d]["a_static"]])
    after: dict[str, Any] = {}
    for s in STRATEGIES:
        aff = _metrics([scored[d][s][n] for d in after_days for n in AFFECTED])
        every = _metrics([scored[d][s][n] for d in after_days for n in names])
        per_inst = {n: _metrics([scored[d][s][n] for d in after_days]) for n in names}
        after[s] = {
            "auprc_new_affected": aff["auprc_new"],
            "auprc_all_affected": aff["auprc_all"],
            "auprc_old_all": every["auprc_old"],
            "recall_old_at_1pct_fpr": every["recall_old_at_1pct_fpr"],
            "recall_old_at_threshold": every["recall_old_at_threshold"],
            "recall_new_affected_at_threshold": aff["recall_new_at_threshold"],
            "precision_micro": every["precision"],
            "precision_macro": float(np.nanmean([per_inst[n]["precision"] for n in names])),
            "precision_by_institution": {n: per_inst[n]["precision"] for n in names},
            "alerts": every["alerts"],
        }
    weekly = []
    for w0 in range(days[0], sz.end_day, 7):
        wd = [d for d in days if w0 <= d < w0 + 7]
        row: dict[str, Any] = {"day": w0}
        for s in STRATEGIES:
            aff = _metrics([scored[d][s][n] for d in wd for n in AFFECTED])
            every = _metrics([scored[d][s][n] for d in wd for n in names])
            per_inst = [_metrics([scored[d][s][n] for d in wd])["precision"] for n in names]
            row[s] = {"auprc_new_affected": aff["auprc_new"], "auprc_old_all": every["auprc_old"],
                      "recall_old_at_threshold": every["recall_old_at_threshold"],
                      "precision_macro": float(np.nanmean(per_inst))}
        weekly.append(row)
    return {"pre_drift": {"auprc_affected_all_fraud": pre_aff["auprc_all"],
                          "auprc_all_institutions": pre_all["auprc_all"],
                          "recall_old_at_1pct_fpr": pre_all["recall_old_at_1pct_fpr"],
                          "precision_micro": pre_all["precision"]},
            "after": after, "weekly": weekly}


def unseen_recall(probe: dict[str, SyntheticInstitution], models: dict[str, GlobalModel], *, eval_from: int,
                  end: int) -> dict[str, dict[str, float]]:
    """Recall on the new scenario at institutions that never trained on it (probe stream, evaluation only)."""
    out = {}
    rows = [probe[n].between_days(eval_from, end) for n in UNSEEN]
    X = np.vstack([r.dataset.X for r in rows])
    sc = np.concatenate([r.scenario for r in rows])
    keep = (sc == 0) | (sc == NEW)
    X, y = X[keep], (sc[keep] == NEW).astype(np.int64)
    for s, model in models.items():
        scores = model.scores(X)
        out[s] = {"recall_at_threshold": float((scores[y == 1] >= model.threshold).mean()),
                  "recall_at_1pct_fpr": recall_at_fpr(y, scores, max_fpr=0.01),
                  "new_scenario_rows": int(y.sum())}
    return out


LABELS = {"a_static": "(a) static", "b_recalibrated": "(b) recalibrated threshold",
          "c_retrained": "(c) retrained, anti-forgetting",
          "d_retrained_no_antiforgetting": "(d) retrained, no anti-forgetting"}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    weekly = result["weekly"]
    x = [w["day"] for w in weekly]
    panels = [("auprc_new_affected", "AUPRC, new scenario (bank_a, bank_b)"),
              ("auprc_old_all", "AUPRC, earlier scenarios (all)"),
              ("recall_old_at_threshold", "recall, earlier scenarios, at threshold"),
              ("precision_macro", "alert precision (mean over institutions)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    for ax, (key, title) in zip(axes.ravel(), panels, strict=True):
        for s in STRATEGIES:
            ax.plot(x, [w[s][key] for w in weekly], marker="o", ms=3, label=LABELS[s])
        ax.axvline(DRIFT_DAY, color="red", ls="--", lw=1)
        for d in result["summary"]["retrain_days"]:
            ax.axvline(d, color="grey", ls=":", lw=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("day (week starting); red: drift, grey: retraining round sets")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (
        f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    after = result["after"]
    lines = [
        "# Continual learning under drift",
        "",
        f"Quick mode: {result['quick']}. New scenario `account_takeover` ({NEW_RATE:.0%} of transactions) at "
        f"{', '.join(AFFECTED)} from day {DRIFT_DAY}; {SHIFTED}: {SPENDING.customer_share:.0%} of customers spend "
        f"{SPENDING.amount_multiplier}x from day {DRIFT_DAY}; {', '.join(STATIONARY)} stationary. Labels arrive "
        f"{LABEL_DELAY_DAYS} days late. Drift confirmed (k=2) on day {s['trigger_day']} at "
        f"{', '.join(s['trigger_institutions'])}; retraining round sets on "
        f"days {s['retrain_days']}; 'after' = days {result['setup']['eval_from_day']}-{result['setup']['end_day']}.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| (c) recovers >= 90 % of pre-drift AUPRC on the new scenario | {_f(s['auprc_retrained_after'])} / "
        f"{_f(s['auprc_pre_drift'])} = {_f(s['recovery_ratio'])} (static: {_f(s['auprc_static_after'])}) | "
        f"{'yes' if s['recovery_ratio'] >= 0.9 else 'no'} |",
        f"| old-scenario recall (at 1 % FPR) drops <= 5 % relative | {_f(s['old_scenario_recall_drop'])} "
        f"(without anti-forgetting: {_f(s['old_scenario_recall_drop_without_antiforgetting'])}) | "
        f"{'yes' if s['old_scenario_recall_drop'] <= 0.05 else 'no'} |",
        f"| (b) improves alert precision over (a) | mean over institutions {_f(s['precision_recalibrated_after'])} "
        f"vs {_f(s['precision_static_after'])}; {SHIFTED} {_f(s['precision_recalibrated_after_shifted_institution'])}"
        f" vs {_f(s['precision_static_after_shifted_institution'])} | "
        f"{'yes' if s['precision_recalibrated_after'] > s['precision_static_after'] else 'no'} |",
        f"| new-scenario recall at the 3 institutions that never saw it (c, at threshold) | "
        f"{_f(s['unseen_institutions_new_scenario_recall'])} (static: "
        f"{_f(s['unseen_institutions_new_scenario_recall_static'])}) | reported |",
        "",
        "## Detectors: delay (days after the drift) and false alarms on stationary data",
        "",
        "| detector | " + " | ".join(f"delay {n}" for n in (*AFFECTED, SHIFTED))
        + " | false-alarm rate (alarms/tests) |",
        "|---|" + "---|" * (len(AFFECTED) + 2),
    ]
    for d, delays in s["detection_delay"].items():
        fa = result["false_alarms_detail"][d]
        lines.append(f"| {d} | " + " | ".join(_f(delays[n]) for n in (*AFFECTED, SHIFTED))
                     + f" | {_f(s['false_alarms_stationary'][d])} ({fa['alarms']}/{fa['tests']} {fa['unit']}s) |")
    lines += [
        "",
        "## Strategies after the drift",
        "",
        "| strategy | AUPRC new (affected) | AUPRC earlier (all) | recall earlier @1%FPR | recall earlier @thr | "
        "recall new (affected) @thr | precision (mean) | precision (pooled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for st in STRATEGIES:
        a = after[st]
        lines.append(f"| {LABELS[st]} | {_f(a['auprc_new_affected'])} | {_f(a['auprc_old_all'])} | "
                     f"{_f(a['recall_old_at_1pct_fpr'])} | {_f(a['recall_old_at_threshold'])} | "
                     f"{_f(a['recall_new_affected_at_threshold'])} | {_f(a['precision_macro'])} | "
                     f"{_f(a['precision_micro'])} |")
    lines += ["", f"Pre-drift (static, days {REF_END}-{DRIFT_DAY}): AUPRC at {', '.join(AFFECTED)} "
              f"{_f(result['pre_drift']['auprc_affected_all_fraud'])}, all institutions "
              f"{_f(result['pre_drift']['auprc_all_institutions'])}.",
              "", f"Timing: {_f(result['timing']['total_s'])} s in total, initial training "
              f"{_f(result['timing']['initial_training_s'])} s.", "", "![drift](drift.png)", ""]
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("consortium").setLevel(logging.WARNING)
    result = run(args.quick)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = "drift_quick" if args.quick else "drift"
    plot(result, RESULTS_DIR / f"{name}.png")
    md = markdown(result).replace("drift.png", f"{name}.png")
    write_results(name, result, md, json_path=args.json_path)
    print(md)


if __name__ == "__main__":
    main()
