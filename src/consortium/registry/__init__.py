"""consortium.registry: durable records of federated runs.

:class:`RunStore` keeps runs, rounds, checkpoints, disclosed institution metrics
and baselines in SQLite or PostgreSQL.  Further concerns add tables on
:class:`consortium.registry.store_schema.Base`.
"""

from consortium.registry.store import (
    BaselineRecord,
    Checkpoint,
    InstitutionMetricRecord,
    RoundRecord,
    RunRecord,
    RunStore,
    mask_url,
)

__all__ = [
    "BaselineRecord",
    "Checkpoint",
    "InstitutionMetricRecord",
    "RoundRecord",
    "RunRecord",
    "RunStore",
    "mask_url",
]
