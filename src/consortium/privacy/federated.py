"""The coordinator's privacy plan: calibrate before training, check before a round, charge with it.

:class:`RunPrivacy` keeps the coordinator's changes small: it builds the
mechanism from the :class:`~consortium.federation.config.FederationConfig`
(calibrating σ to ``target_epsilon`` for the planned rounds, and composing with
what the ledger already holds for each institution's data), refuses a round that
would exceed an institution's budget before it starts, and hands the coordinator
a function that writes the round's charges inside the round's own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from consortium.errors import ConfigError
from consortium.federation.config import FederationConfig
from consortium.privacy.accounting import check_delta, default_delta, estimate
from consortium.privacy.dpsgd import negative_clip_ratio
from consortium.privacy.ledger import PrivacyLedger
from consortium.privacy.mechanisms import DpSgdMechanism
from consortium.registry import RunStore

logger = logging.getLogger(__name__)

__all__ = ["RunPrivacy"]


@dataclass
class RunPrivacy:
    """Privacy state of one coordinator run (record-level DP-SGD)."""

    mechanism: DpSgdMechanism
    delta: float
    rounds: int
    ledger: PrivacyLedger
    data_ids: Mapping[str, str]
    budget: float | None
    negative_ratio: float
    lr: float

    @classmethod
    def plan(
        cls,
        config: FederationConfig,
        *,
        store: RunStore,
        data_ids: Mapping[str, str],
        rows_per_institution: float,
        positive_rate: float,
    ) -> RunPrivacy | None:
        """The run's mechanism, or None without DP; all checks happen here, before training."""
        if config.dp == "none":
            return None
        if config.dp != "dpsgd":
            raise ConfigError(f"Privacy mode {config.dp!r} is not available in the coordinator; use 'dpsgd'.")
        owner = "FederationConfig"
        n = max(int(rows_per_institution), 1)
        delta = config.delta or default_delta(n)
        check_delta(delta, owner, n_protected=n)
        params = {
            "clip_norm": config.dp_clip,
            "sampling_rate": config.dp_sampling_rate,
            "steps_per_round": config.dp_local_steps,
        }
        if config.target_epsilon > 0:
            mech = DpSgdMechanism.calibrated(
                target_epsilon=config.target_epsilon, delta=delta, rounds=config.num_rounds, **params
            )
        else:
            mech = DpSgdMechanism(noise_multiplier=config.dp_noise_multiplier, **params)  # type: ignore[arg-type]
        planned = estimate(mech.event(config.num_rounds), delta)
        logger.warning(
            "DP-SGD: noise multiplier σ = %.4f, clip C = %g, q = %g, %d steps/round x %d rounds -> ε = %.4f "
            "(RDP %.4f) at δ = %.3g per institution for this run",
            mech.noise_multiplier,
            mech.clip_norm,
            mech.sampling_rate,
            mech.steps_per_round,
            config.num_rounds,
            planned.epsilon,
            planned.epsilon_rdp,
            delta,
        )
        return cls(
            mechanism=mech,
            delta=delta,
            rounds=config.num_rounds,
            ledger=PrivacyLedger(store),
            data_ids=dict(data_ids),
            budget=config.budget_epsilon or None,
            negative_ratio=negative_clip_ratio(positive_rate),
            lr=config.dp_lr,
        )

    def client_config(self) -> dict[str, int | float | str]:
        """What every institution needs to run the accounted mechanism."""
        return {
            "dp": "dpsgd",
            "dp-noise-multiplier": self.mechanism.noise_multiplier,
            "dp-clip": self.mechanism.clip_norm,
            "dp-sampling-rate": self.mechanism.sampling_rate,
            "dp-local-steps": self.mechanism.steps_per_round,
            "dp-negative-ratio": self.negative_ratio,
            "dp-lr": self.lr,
        }

    def check_before_round(self, institutions: Sequence[str]) -> None:
        """Raise :class:`PrivacyBudgetError` if the next round would exceed any budget."""
        for inst in institutions:
            self.ledger.check_budget(
                institution=inst,
                data_id=self.data_ids.get(inst, "unknown"),
                event=self.mechanism.round_event(),
                delta=self.delta,
                budget_epsilon=self.budget,
            )

    def charges_for(self, run_id: str, rnd: int, institutions: Sequence[str]) -> Callable[[Session], object]:
        """Work for ``RunStore.record_round(also=...)``: one charge per institution, same transaction."""

        def work(session: Session) -> None:
            for inst in institutions:
                self.ledger.charge(
                    run_id=run_id,
                    institution=inst,
                    data_id=self.data_ids.get(inst, "unknown"),
                    round=rnd,
                    mechanism=self.mechanism.name,
                    event=self.mechanism.round_event(),
                    delta=self.delta,
                    budget_epsilon=self.budget,
                    params=self.mechanism.params(),
                    session=session,
                )

        return work

    def statement(self, institutions: Sequence[str] | None = None) -> dict[str, Any]:
        """(ε, δ), mechanism and parameters: cumulative per institution from the ledger."""
        names = list(institutions or self.data_ids)
        per_inst = {
            inst: self.ledger.spent(
                institution=inst, data_id=self.data_ids.get(inst, "unknown"), delta=self.delta
            ).epsilon
            for inst in names
        }
        return {
            "epsilon": max(per_inst.values(), default=0.0),
            "delta": self.delta,
            "mechanism": self.mechanism.name,
            "params": {**self.mechanism.params(), "negative_clip_ratio": self.negative_ratio},
            "epsilon_per_institution": per_inst,
            "note": "standardisation statistics are exact secure-aggregation sums in the coordinator path (not DP)",
        }
