"""Canary audit: insert records, train, and bound ε from below.

``2k`` canaries are drawn - jittered copies of the institution's majority-class
rows given the rare (minority) label: off the data manifold where it matters
(no real row near them carries that label), so the model can only predict a
canary's label by memorising it, and a held-out canary gets a confidently wrong
prediction. (Far out-of-distribution rows with random labels were tried first:
ReLU extrapolation gives unseen canaries large logits of either sign, which
drowns the membership signal.) ``k`` of them, chosen at random, are
inserted into one institution's training data; the other ``k`` are never seen.
After training (with or without DP, :func:`~consortium.privacy.inprocess.train_private_federated`),
each canary's score is its logit confidence in its own label. Half of the
canaries pick the threshold; the other half give the TPR/FPR and the
Clopper-Pearson bound ``ε ≥ log((TPR_lo - δ) / FPR_hi)``
(:func:`~consortium.privacy.audit.epsilon_lower_bound_at`), so the interval is
honest. Under a correct accountant the lower bound stays below the reported ε;
a lower bound above it shows a bug (noise, clipping or accounting).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consortium.errors import param_error
from consortium.privacy.audit import attack_auc, epsilon_lower_bound_split, logit_confidence
from consortium.privacy.inprocess import InProcessConfig, train_private_federated

logger = logging.getLogger(__name__)

__all__ = ["CanaryAudit", "canary_audit", "make_canaries"]


@dataclass(frozen=True)
class CanaryAudit:
    """Outcome of :func:`canary_audit`.

    Attributes
    ----------
    n_canaries : int
        Canaries inserted (as many more were held out).
    auc : float
        Membership AUC over all canaries (inserted vs held out).
    tpr, fpr : float
        At the threshold chosen on the selection half, on the evaluation half.
    epsilon_point : float
        ``log(TPR / FPR)`` on the evaluation half.
    epsilon_lower : float
        One-sided 95 % lower confidence bound on ε.
    epsilon_accountant : float
        ε the accountant reported for the run (``inf`` without DP).
    delta : float
        δ of both.
    """

    n_canaries: int
    auc: float
    tpr: float
    fpr: float
    epsilon_point: float
    epsilon_lower: float
    epsilon_accountant: float
    delta: float

    @property
    def consistent(self) -> bool:
        """The empirical lower bound does not exceed the accountant's ε."""
        return self.epsilon_lower <= self.epsilon_accountant


def make_canaries(
    X: np.ndarray,  # noqa: N803
    y: np.ndarray,
    n: int,
    *,
    jitter: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` canaries: majority-class rows of ``(X, y)`` plus ``jitter``·std Gaussian noise, with the minority label.

    Returns the canaries' features ``(n, n_features)`` and labels ``(n,)``.
    """
    y = np.asarray(y)
    minority = int(np.mean(y) < 0.5)
    pool = np.asarray(X)[y != minority]
    if len(pool) == 0:
        raise param_error("y", "make_canaries", "labels with both classes", f"only class {1 - minority}")
    scale = np.asarray(X).std(axis=0) + 1e-9
    rows = pool[rng.integers(0, len(pool), size=n)]
    cx = rows + jitter * scale * rng.normal(size=rows.shape)
    return cx.astype(np.float32), np.full(n, minority, dtype=np.int64)


def canary_audit(
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    config: InProcessConfig,
    *,
    n_canaries: int = 64,
    institution: int = 0,
    jitter: float = 0.5,
    confidence: float = 0.95,
    seed: int = 0,
) -> CanaryAudit:
    """Insert ``n_canaries`` canaries into ``parts[institution]``, train, and measure.

    Parameters
    ----------
    parts : Sequence[tuple[np.ndarray, np.ndarray]]
        One ``(X, y)`` per institution (raw features).
    config : InProcessConfig
        Training and privacy; ``mode="none"`` audits a non-private run.
    n_canaries : int
        Inserted canaries (>= 8); as many are held out.
    institution : int
        Index of the institution that receives them.
    jitter : float
        Standard deviation of the noise added to a canary's source row, per feature std.
    confidence : float
        Of the ε lower bound.
    seed : int
        Draw of canaries, which ones are inserted, and the split.
    """
    owner = "canary_audit"
    if n_canaries < 8:
        raise param_error("n_canaries", owner, "an int >= 8", n_canaries)
    if not 0 <= institution < len(parts):
        raise param_error("institution", owner, f"an index in [0, {len(parts)})", institution)
    rng = np.random.default_rng(seed)
    X0, y0 = parts[institution]  # noqa: N806
    cx, cy = make_canaries(X0, y0, 2 * n_canaries, jitter=jitter, rng=rng)
    inserted = rng.permutation(2 * n_canaries)[:n_canaries]
    is_in = np.zeros(2 * n_canaries, dtype=bool)
    is_in[inserted] = True
    new_parts = list(parts)
    new_parts[institution] = (np.concatenate([X0, cx[is_in]]), np.concatenate([y0, cy[is_in]]))
    result = train_private_federated(new_parts, config)
    score = logit_confidence(result.scores(cx), cy)
    bound = epsilon_lower_bound_split(
        score[is_in], score[~is_in], delta=config.delta, confidence=confidence, seed=seed + 1
    )
    out = CanaryAudit(
        n_canaries=n_canaries,
        auc=attack_auc(score[is_in], score[~is_in]),
        tpr=bound["tpr"],
        fpr=bound["fpr"],
        epsilon_point=bound["epsilon_point"],
        epsilon_lower=bound["epsilon_lower"],
        epsilon_accountant=result.epsilon,
        delta=config.delta,
    )
    logger.info("canary audit (%s): %s", config.mode, out)
    return out
