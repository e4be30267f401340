"""Membership audit of a trained model: loss-threshold and LiRA AUC, empirical ε.

:func:`membership_audit` is what ``consortium privacy audit RUN`` prints: given the
model's scoring function, rows it trained on (members), rows it never saw
(non-members) and public rows for shadow models, it reports both attacks' AUC
and the honest empirical ε lower bound (threshold chosen on one half, bound on
the other) from the stronger attack, for comparison with the accountant's ε.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from consortium.errors import param_error
from consortium.privacy.audit import (
    attack_auc,
    bce_losses,
    epsilon_lower_bound_split,
    lira_offline_scores,
    logit_confidence,
    shadow_out_confidences,
)

logger = logging.getLogger(__name__)

__all__ = ["MembershipAudit", "membership_audit"]

Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class MembershipAudit:
    """Outcome of :func:`membership_audit` (AUC 0.5 = the attack learns nothing)."""

    n_members: int
    n_nonmembers: int
    n_shadows: int
    auc_loss: float
    auc_lira: float
    epsilon_lower: float
    epsilon_point: float
    attack: str
    delta: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def membership_audit(
    score: Scorer,
    members: tuple[np.ndarray, np.ndarray],
    nonmembers: tuple[np.ndarray, np.ndarray],
    public: tuple[np.ndarray, np.ndarray],
    *,
    train_shadow: Callable[[np.ndarray, np.ndarray, int], Scorer],
    n_shadows: int = 4,
    delta: float = 0.0,
    seed: int = 0,
) -> MembershipAudit:
    """Run the loss-threshold attack and offline LiRA on ``score``.

    Parameters
    ----------
    score : callable
        Features -> probabilities of the audited model.
    members, nonmembers : tuple of np.ndarray
        ``(X, y)`` it trained on / never saw; the larger is cut to the smaller size.
    public : tuple of np.ndarray
        ``(X, y)`` the shadows train on (disjoint from both).
    train_shadow : callable
        ``(X, y, seed) -> scorer``: the target's training recipe.
    n_shadows : int
        Shadow models (>= 2).
    delta : float
        δ of the ε lower bound.
    seed : int
        Shadows' subsets and the threshold split.
    """
    k = min(len(members[1]), len(nonmembers[1]))
    if k < 8:
        raise param_error("members", "membership_audit", "at least 8 member and 8 non-member rows", k)
    Xm, ym = members[0][:k], members[1][:k]  # noqa: N806
    Xn, yn = nonmembers[0][:k], nonmembers[1][:k]  # noqa: N806
    sm, sn = score(Xm), score(Xn)
    auc_loss = attack_auc(-bce_losses(sm, ym), -bce_losses(sn, yn))
    Xt, yt = np.concatenate([Xm, Xn]), np.concatenate([ym, yn])  # noqa: N806
    shadows = shadow_out_confidences(train_shadow, public[0], public[1], Xt, yt, n_shadows=n_shadows, seed=seed)
    lira = lira_offline_scores(logit_confidence(np.concatenate([sm, sn]), yt), shadows)
    auc_lira = attack_auc(lira[:k], lira[k:])
    # The empirical ε comes from the stronger attack's scores (an AUC below 0.5 is no attack).
    use_lira = auc_lira >= auc_loss
    member_s, non_s = (lira[:k], lira[k:]) if use_lira else (-bce_losses(sm, ym), -bce_losses(sn, yn))
    bound = epsilon_lower_bound_split(member_s, non_s, delta=delta, seed=seed)
    return MembershipAudit(
        n_members=k,
        n_nonmembers=k,
        n_shadows=n_shadows,
        auc_loss=auc_loss,
        auc_lira=auc_lira,
        epsilon_lower=bound["epsilon_lower"],
        epsilon_point=bound["epsilon_point"],
        attack="lira" if use_lira else "loss",
        delta=delta,
    )
