"""consortium.data: datasets, loaders, a synthetic multi-institution generator, partitioners.

* :class:`Dataset` — validated features + binary labels (``dataset``);
* :func:`load_npz`, :func:`load_csv`, :func:`save_npz` — files in, files out (``loaders``);
* :func:`generate_federation`, :func:`generate_institution`, :func:`default_profiles`
  — non-IID synthetic card transactions with labelled fraud scenarios (``synthetic``);
* :func:`federate`, :func:`federate_institutions` and the partitioners — federations,
  holdouts and local train/val/test splits, saved and loaded as directories
  (``partition``).
"""

from consortium.data.dataset import Dataset, check_same_features, concat
from consortium.data.federated_split import FederatedSplit, InstitutionSplit
from consortium.data.loaders import load_csv, load_npz, save_npz
from consortium.data.naming import institution_name, institution_names
from consortium.data.partition import (
    federate,
    federate_institutions,
    holdout_split,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
)
from consortium.data.scenarios import (
    BASE_SCENARIOS,
    SCENARIO_IDS,
    SCENARIOS,
    ScenarioEvent,
    scenario_id,
    scenario_name,
)
from consortium.data.split_store import load_institution, load_split, save_split
from consortium.data.synthetic import (
    InstitutionProfile,
    SpendingDrift,
    SyntheticInstitution,
    default_profiles,
    generate_federation,
    generate_institution,
)
from consortium.data.transaction_features import FEATURE_NAMES, LABEL_DELAY_DAYS

__all__ = [
    "BASE_SCENARIOS",
    "FEATURE_NAMES",
    "LABEL_DELAY_DAYS",
    "SCENARIOS",
    "SCENARIO_IDS",
    "Dataset",
    "FederatedSplit",
    "InstitutionProfile",
    "InstitutionSplit",
    "ScenarioEvent",
    "SpendingDrift",
    "SyntheticInstitution",
    "check_same_features",
    "concat",
    "default_profiles",
    "federate",
    "federate_institutions",
    "generate_federation",
    "generate_institution",
    "holdout_split",
    "institution_name",
    "institution_names",
    "load_csv",
    "load_institution",
    "load_npz",
    "load_split",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "save_npz",
    "save_split",
    "scenario_id",
    "scenario_name",
]
