"""Names shared by the ServerApp and the ClientApp: message types and record keys.

Keeping them in one module makes the wire contract between coordinator and
institutions explicit; every record a message carries is listed here.
"""

from __future__ import annotations

from typing import Final

# Message types (Flower routes "<category>.<action>" to the registered handler).
INFO: Final = "query.info"
"""Institution name, feature schema and disclosure setting (no data)."""
STATS: Final = "query.stats"
"""Additive feature statistics for federated standardisation."""
TRAIN: Final = "train"
EVALUATE: Final = "evaluate"

# Record keys.
GLOBAL_ARRAYS: Final = "arrays"
"""ArrayRecord with the global model parameters, in model order."""
STANDARDIZER: Final = "standardizer"
"""ArrayRecord with ``mean`` and ``std`` of the federated standardisation."""
CONFIG: Final = "config"
INFO_RECORD: Final = "info"
UPDATE: Final = "update"
"""ArrayRecord with an institution's contribution to a sum (model delta or statistics)."""
METRICS: Final = "metrics"
VAL_HISTOGRAM: Final = "val-histogram"
"""ArrayRecord with per-class validation score histograms (``neg``, ``pos``)."""
WEIGHT: Final = "num-examples"

HISTOGRAM_BINS: Final = 2000
"""Bins on [0, 1] for federated threshold selection (scores are mapped to [0, 1])."""

# Node config keys (``flower-supernode --node-config``).
NODE_DATA_PATH: Final = "data-path"
NODE_INSTITUTION: Final = "institution"
NODE_DISCLOSE_EVAL: Final = "disclose-eval"
