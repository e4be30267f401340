"""Empirical privacy audit: membership inference and an ε lower bound.

* :func:`loss_threshold_auc` - the loss-threshold membership attack (Yeom et al.
  2018): members tend to have lower loss; its ROC-AUC over members vs.
  non-members is the attack's success (0.5 = no better than guessing).
* :func:`epsilon_lower_bound` - from an attack's true/false positive counts on
  members/non-members (e.g. inserted canaries), the ε that any (ε, δ)-DP
  guarantee must at least have, with Clopper-Pearson confidence bounds
  (Jagielski et al. 2020): ``ε ≥ log((TPR_lo - δ) / FPR_hi)``.
The accountant's ε must lie above the lower bound; a lower bound above it is a bug.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score

__all__ = ["bce_losses", "epsilon_lower_bound", "loss_threshold_auc"]


def bce_losses(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row binary cross-entropy of predicted probabilities."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC-AUC of "lower loss ⇒ member" (0.5 = the attack learns nothing)."""
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    return float(roc_auc_score(labels, -np.concatenate([member_losses, nonmember_losses])))


def _cp_lower(k: int, n: int, alpha: float) -> float:
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def _cp_upper(k: int, n: int, alpha: float) -> float:
    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def epsilon_lower_bound(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Best empirical ε lower bound over thresholds ("score > t ⇒ member").

    Returns the point estimate and the one-sided ``confidence`` lower bound.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    nm = np.asarray(nonmember_scores, dtype=np.float64)
    alpha = 1 - confidence
    best = {"epsilon_point": 0.0, "epsilon_lower": 0.0, "threshold": math.nan}
    for t in np.unique(np.concatenate([m, nm])):
        tp, fp = int((m > t).sum()), int((nm > t).sum())
        for a, b, na, nb in ((tp, fp, len(m), len(nm)), (len(nm) - fp, len(m) - tp, len(nm), len(m))):
            tpr, fpr = a / na, b / nb
            point = math.log(max(tpr - delta, 1e-12) / max(fpr, 1.0 / nb)) if tpr > delta else 0.0
            lo_tpr, hi_fpr = _cp_lower(a, na, alpha / 2), _cp_upper(b, nb, alpha / 2)
            lower = math.log((lo_tpr - delta) / hi_fpr) if lo_tpr > delta and hi_fpr > 0 else 0.0
            if lower > best["epsilon_lower"]:
                best = {"epsilon_point": max(point, 0.0), "epsilon_lower": lower, "threshold": float(t)}
    return best
