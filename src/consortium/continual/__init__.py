"""consortium.continual — detect drift, adapt locally, retrain federated when it matters.

* :mod:`.feature_drift` — PSI and two-sample KS per feature and on scores
  (:class:`FeatureDriftDetector`, :class:`ScoreDriftDetector`).
* :mod:`.performance` — delayed labels joined by transaction id; ADWIN /
  Page-Hinkley on miss and false-alert streams (:class:`DelayedLabelMonitor`).
* :mod:`.recalibration` — :class:`ThresholdRecalibrator` (target alert rate or precision).
* :mod:`.personalize` — :func:`fine_tune_last_layer` (stays at the institution).
* :mod:`.monitor` — :class:`DriftMonitor`, the edge agent's hook (DriftReport / Event messages).
* :mod:`.trigger` — :class:`DriftVotes`, :class:`RetrainTrigger` (MQTT, k institutions).
* :mod:`.rehearsal`, :mod:`.retrain`, :mod:`.orchestrate` — retraining from the current
  model without forgetting, and the service the trigger calls.
* :mod:`.ota` — :class:`RegistryPublisher`, the OTA hook (signed bundle, registry, announcement);
  imported from its module (it pulls in the registry's exporter).

See docs/continual.md.
"""

from consortium.continual.errors import DriftInputError
from consortium.continual.feature_drift import (
    FeatureDriftDetector,
    FeatureDriftResult,
    ScoreDriftDetector,
    ks_test,
    population_stability_index,
)
from consortium.continual.monitor import DriftMonitor, WindowVerdict
from consortium.continual.orchestrate import RetrainingRecord, RetrainingService
from consortium.continual.performance import DelayedLabelMonitor, LabelCounts
from consortium.continual.personalize import fine_tune_last_layer
from consortium.continual.recalibration import Recalibration, ThresholdRecalibrator, precision_threshold
from consortium.continual.rehearsal import RehearsalBuffer
from consortium.continual.retrain import (
    GlobalModel,
    LocalData,
    RetrainConfig,
    RetrainResult,
    federated_retrain,
    initial_training,
)
from consortium.continual.trigger import DriftVotes, RetrainTrigger, TriggerDecision

__all__ = [
    "DelayedLabelMonitor",
    "DriftInputError",
    "DriftMonitor",
    "DriftVotes",
    "FeatureDriftDetector",
    "FeatureDriftResult",
    "GlobalModel",
    "LabelCounts",
    "LocalData",
    "Recalibration",
    "RehearsalBuffer",
    "RetrainConfig",
    "RetrainResult",
    "RetrainTrigger",
    "RetrainingRecord",
    "RetrainingService",
    "ScoreDriftDetector",
    "ThresholdRecalibrator",
    "TriggerDecision",
    "WindowVerdict",
    "federated_retrain",
    "fine_tune_last_layer",
    "initial_training",
    "ks_test",
    "population_stability_index",
    "precision_threshold",
]
