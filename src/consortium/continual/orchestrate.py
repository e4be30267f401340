"""From a confirmed drift to a new bundle: the retraining service the trigger calls.

:class:`RetrainingService` is the ``on_trigger`` callback of
:class:`~consortium.continual.trigger.RetrainTrigger`: it gathers the
institutions' local data for the round set (``collect``), retrains from the
current global model (:func:`~consortium.continual.retrain.federated_retrain`,
with rehearsal and the proximal term unless configured off), makes the result
the current model, and hands it to ``publish`` — the OTA hook that exports the
model, signs a bundle and adds it to the registry so that edge agents pick it
up (``consortium.registry`` provides the bundle writer; see docs/continual.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from consortium.continual.retrain import GlobalModel, LocalData, RetrainConfig, RetrainResult, federated_retrain
from consortium.continual.trigger import TriggerDecision

logger = logging.getLogger(__name__)

Collect = Callable[[TriggerDecision], Mapping[str, LocalData]]
Publish = Callable[[GlobalModel], str]
"""Export + sign + register a model; returns where it was published (bundle path or version)."""


@dataclass(frozen=True)
class RetrainingRecord:
    """One completed drift-triggered retraining."""

    decision: TriggerDecision
    result: RetrainResult
    published: str | None


class RetrainingService:
    """Retrain on confirmed drift and publish the new model.

    Parameters
    ----------
    current : GlobalModel
        The deployed global model (the starting point of the next round set).
    collect : callable
        ``decision -> {institution: LocalData}``: the rows each institution
        trains on (recent rows; its rehearsal buffer travels inside LocalData).
    config : RetrainConfig
        Round-set options (anti-forgetting on by default).
    publish : callable, optional
        OTA hook called with the new model.
    """

    def __init__(self, *, current: GlobalModel, collect: Collect, config: RetrainConfig | None = None,
                 publish: Publish | None = None) -> None:
        self.current = current
        self.collect = collect
        self.config = config or RetrainConfig()
        self.publish = publish
        self.history: list[RetrainingRecord] = []
        self._lock = threading.Lock()

    def next_version(self) -> str:
        """Version string of the next model (integer versions count up; others get a suffix)."""
        v = self.current.version
        return str(int(v) + 1) if v.isdigit() else f"{v}.{len(self.history) + 1}"

    def __call__(self, decision: TriggerDecision) -> RetrainingRecord:
        with self._lock:  # one round set at a time
            data = self.collect(decision)
            logger.info("retraining from model %s on %d institutions after drift at %s",
                        self.current.version, len(data), list(decision.institutions))
            result = federated_retrain(data, start=self.current, config=self.config, version=self.next_version())
            self.current = result.model
            published = self.publish(result.model) if self.publish is not None else None
            record = RetrainingRecord(decision=decision, result=result, published=published)
            self.history.append(record)
            return record
