"""The data layout of one federated experiment: per-institution splits plus a holdout.

Every experiment — simulated or deployed — sees its data through a
:class:`FederatedSplit`: each institution has its own train / validation / test
sets, and a global holdout that no institution trains on measures the shared
model fairly.  The centralized baseline trains on the pooled institution
training sets, so pooling lives here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from consortium.data.dataset import Dataset, check_same_features, concat
from consortium.data.naming import check_institution_name
from consortium.errors import DataError, param_error


@dataclass(frozen=True)
class InstitutionSplit:
    """One institution's local data.

    Parameters
    ----------
    name : str
        Institution name (path-safe).
    train, val, test : Dataset
        Local training, validation (early stopping, calibration) and test sets,
        with identical feature columns.
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset

    def __post_init__(self) -> None:
        check_institution_name(self.name, owner="InstitutionSplit")
        for part in ("train", "val", "test"):
            if not isinstance(getattr(self, part), Dataset):
                raise param_error(
                    part, "InstitutionSplit", "a Dataset", type(getattr(self, part)).__name__
                )
        check_same_features([self.train, self.val, self.test])

    @property
    def n_rows(self) -> int:
        """Rows over train, val and test."""
        return self.train.n_rows + self.val.n_rows + self.test.n_rows

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The shared feature columns."""
        return self.train.feature_names


@dataclass(frozen=True)
class FederatedSplit:
    """All institutions' splits plus the global holdout.

    Parameters
    ----------
    institutions : tuple of InstitutionSplit
        At least one institution; names must be unique.
    holdout : Dataset
        Global held-out test set that no institution trains on.

    Raises
    ------
    DataError
        If feature columns differ anywhere.
    ConfigError
        If there are no institutions or names repeat.
    """

    institutions: tuple[InstitutionSplit, ...]
    holdout: Dataset

    def __post_init__(self) -> None:
        insts = tuple(self.institutions)
        if not insts or not all(isinstance(i, InstitutionSplit) for i in insts):
            raise param_error(
                "institutions",
                "FederatedSplit",
                "a non-empty sequence of InstitutionSplit",
                self.institutions,
            )
        names = [i.name for i in insts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise param_error(
                "institutions",
                "FederatedSplit",
                "institutions with unique names",
                f"duplicated names {dupes}",
            )
        if not isinstance(self.holdout, Dataset):
            raise param_error("holdout", "FederatedSplit", "a Dataset", type(self.holdout).__name__)
        check_same_features([*(i.train for i in insts), self.holdout])
        object.__setattr__(self, "institutions", insts)

    def names(self) -> list[str]:
        """Institution names, in order."""
        return [i.name for i in self.institutions]

    def institution(self, name: str) -> InstitutionSplit:
        """The split of institution ``name``."""
        for inst in self.institutions:
            if inst.name == name:
                return inst
        raise DataError(
            f"No institution named {name!r} in this split; institutions are {self.names()}."
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The shared feature columns."""
        return self.holdout.feature_names

    def pooled_train(self) -> Dataset:
        """All institutions' training sets stacked (for the centralized baseline)."""
        return concat([i.train for i in self.institutions], name="pooled_train")

    def pooled_val(self) -> Dataset:
        """All institutions' validation sets stacked."""
        return concat([i.val for i in self.institutions], name="pooled_val")

    def pooled_test(self) -> Dataset:
        """All institutions' local test sets stacked."""
        return concat([i.test for i in self.institutions], name="pooled_test")
