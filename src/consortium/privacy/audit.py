"""Empirical privacy audit: membership inference and an ε lower bound.

* :func:`loss_threshold_auc` - the loss-threshold membership attack (Yeom et al.
  2018): members tend to have lower loss; its ROC-AUC over members vs.
  non-members is the attack's success (0.5 = no better than guessing).
* :func:`epsilon_lower_bound` - from an attack's true/false positive counts on
  members/non-members (e.g. inserted canaries), the ε that any (ε, δ)-DP
  guarantee must at least have, with Clopper-Pearson confidence bounds
  (Jagielski et al. 2020): ``ε ≥ log((TPR_lo - δ) / FPR_hi)``.
* :func:`logit_confidence` and :func:`lira_offline_scores` - the offline
  likelihood-ratio attack (LiRA, Carlini et al. 2022): a few shadow models trained
  on public/synthetic data never see the audited rows, so for every row they give
  its "OUT" distribution of logit-scaled confidence; a Gaussian is fitted per row
  and the score is how far above that OUT distribution the audited model's
  confidence lies (one-sided log-likelihood test).
* :mod:`consortium.privacy.audit_canary` - the canary audit (inserted records).
The accountant's ε must lie above the lower bound; a lower bound above it is a bug.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import beta, norm
from sklearn.metrics import roc_auc_score

from consortium.errors import param_error

__all__ = [
    "attack_auc",
    "bce_losses",
    "epsilon_lower_bound",
    "epsilon_lower_bound_at",
    "epsilon_lower_bound_split",
    "lira_offline_scores",
    "logit_confidence",
    "shadow_out_confidences",
    "loss_threshold_auc",
]


def bce_losses(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row binary cross-entropy of predicted probabilities."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def loss_threshold_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC-AUC of "lower loss ⇒ member" (0.5 = the attack learns nothing)."""
    labels = np.concatenate([np.ones(len(member_losses)), np.zeros(len(nonmember_losses))])
    return float(roc_auc_score(labels, -np.concatenate([member_losses, nonmember_losses])))


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC-AUC of "higher score ⇒ member" (0.5 = the attack learns nothing)."""
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    return float(roc_auc_score(labels, np.concatenate([member_scores, nonmember_scores])))


def logit_confidence(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence in the true label, ``log(p_y / (1 - p_y))``.

    LiRA's statistic: unlike the raw probability it is close to Gaussian across
    training runs, so a Gaussian fit per row is a good model of it.
    """
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    p_y = np.where(np.asarray(y) > 0.5, p, 1 - p)
    return np.log(p_y) - np.log1p(-p_y)


def lira_offline_scores(
    target_confidence: np.ndarray,
    shadow_out_confidence: np.ndarray,
    *,
    min_std: float = 1e-3,
) -> np.ndarray:
    """Offline LiRA membership scores (higher ⇒ more likely a member).

    Parameters
    ----------
    target_confidence : np.ndarray
        ``(n,)`` logit confidences (:func:`logit_confidence`) of the audited model on
        the audited rows.
    shadow_out_confidence : np.ndarray
        ``(n_shadows, n)`` logit confidences of shadow models that did *not* train
        on these rows (trained on public/synthetic data).
    min_std : float
        Floor on the fitted standard deviation (a global one is used when the
        shadows are too few for a per-row estimate).

    Returns
    -------
    np.ndarray
        ``log P(OUT confidence < observed)`` under the per-row Gaussian fitted to
        the shadows' OUT confidences: the offline one-sided likelihood test of
        Carlini et al. (2022), Algorithm 1 with only OUT models.
    """
    owner = "lira_offline_scores"
    out = np.atleast_2d(np.asarray(shadow_out_confidence, dtype=np.float64))
    target = np.asarray(target_confidence, dtype=np.float64)
    if out.shape[1] != target.shape[0]:
        raise param_error(
            "shadow_out_confidence", owner, f"of shape (n_shadows, {target.shape[0]})", f"shape {out.shape}"
        )
    if out.shape[0] < 2:
        raise param_error("shadow_out_confidence", owner, "from at least 2 shadow models", out.shape[0])
    mu = out.mean(axis=0)
    # Few shadows: a per-row std is noisy, so use the global one (Carlini et al.'s fixed-variance variant).
    sd = out.std(axis=0, ddof=1) if out.shape[0] >= 16 else np.full_like(mu, out.std(axis=0, ddof=1).mean())
    return np.asarray(norm.logcdf(target, loc=mu, scale=np.maximum(sd, min_std)))


def shadow_out_confidences(
    train: Callable[[np.ndarray, np.ndarray, int], Callable[[np.ndarray], np.ndarray]],
    public_X: np.ndarray,  # noqa: N803
    public_y: np.ndarray,
    target_X: np.ndarray,  # noqa: N803
    target_y: np.ndarray,
    *,
    n_shadows: int = 4,
    fraction: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Logit confidences ``(n_shadows, n_target)`` of shadow models on the audited rows.

    Each shadow is ``train(X, y, seed)`` (the target's training recipe, as the
    attacker is assumed to know it) on a random ``fraction`` of the public rows,
    returning a function from features to probabilities. No audited row is in any
    shadow's training data, so all of them are OUT for every shadow.
    """
    owner = "shadow_out_confidences"
    if n_shadows < 2:
        raise param_error("n_shadows", owner, "an int >= 2", n_shadows)
    if not 0 < fraction <= 1:
        raise param_error("fraction", owner, "a float in (0, 1]", fraction)
    rng = np.random.default_rng(seed)
    n = len(public_y)
    out = []
    for i in range(n_shadows):
        rows = rng.permutation(n)[: max(int(fraction * n), 1)]
        score = train(np.asarray(public_X)[rows], np.asarray(public_y)[rows], seed + 1 + i)
        out.append(logit_confidence(score(target_X), target_y))
    return np.stack(out)


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


def epsilon_lower_bound_at(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    threshold: float,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """ε lower bound of the single test "score > ``threshold`` ⇒ member".

    With a threshold chosen on *other* data this is a valid one-sided
    ``confidence`` bound; :func:`epsilon_lower_bound` searches all thresholds on
    the same scores, which makes its interval optimistic.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    nm = np.asarray(nonmember_scores, dtype=np.float64)
    tp, fp = int((m > threshold).sum()), int((nm > threshold).sum())
    alpha = 1 - confidence
    tpr, fpr = tp / len(m), fp / len(nm)
    point = math.log(max(tpr - delta, 1e-12) / max(fpr, 1.0 / len(nm))) if tpr > delta else 0.0
    lo_tpr, hi_fpr = _cp_lower(tp, len(m), alpha), _cp_upper(fp, len(nm), alpha)
    lower = math.log((lo_tpr - delta) / hi_fpr) if lo_tpr > delta and hi_fpr > 0 else 0.0
    return {
        "epsilon_point": max(point, 0.0),
        "epsilon_lower": max(lower, 0.0),
        "threshold": float(threshold),
        "tpr": tpr,
        "fpr": fpr,
    }


def epsilon_lower_bound_split(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Honest ε lower bound: pick the threshold on a random half, bound on the other half.

    Returns :func:`epsilon_lower_bound_at`'s keys for the evaluation half.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    nm = np.asarray(nonmember_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sel_m, sel_n = rng.random(len(m)) < 0.5, rng.random(len(nm)) < 0.5
    if min(sel_m.sum(), (~sel_m).sum(), sel_n.sum(), (~sel_n).sum()) == 0:
        raise param_error(
            "member_scores",
            "epsilon_lower_bound_split",
            "at least 4 members and 4 non-members",
            f"{len(m)} and {len(nm)}",
        )
    # Only "score > t ⇒ member": the direction the attack claims; the best threshold on the selection half.
    threshold, best = float(np.median(m[sel_m])), -1.0
    for t in np.unique(np.concatenate([m[sel_m], nm[sel_n]])):
        got = epsilon_lower_bound_at(m[sel_m], nm[sel_n], threshold=float(t), delta=delta, confidence=confidence)
        if got["epsilon_lower"] > best:
            threshold, best = float(t), got["epsilon_lower"]
    return epsilon_lower_bound_at(m[~sel_m], nm[~sel_n], threshold=threshold, delta=delta, confidence=confidence)
