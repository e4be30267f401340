"""Model architectures, a builder registry and flat parameter exchange.

Two model families cover the consortium's use cases:

* :class:`MLPClassifier` — supervised fraud scoring from labelled transactions;
  its ``forward`` returns one logit per row.
* :class:`Autoencoder` — unsupervised anomaly scoring for institutions with few or
  no fraud labels; trained on normal rows, its reconstruction error is the score.

Federated learning moves models as a list of numpy arrays (Flower's
``NDArrays``).  :func:`get_parameters` and :func:`set_parameters` convert between a
module and that list in ``state_dict`` order, and :func:`set_parameters` checks
every array before touching the model, so a bad update from a peer can never
leave a half-loaded or NaN-poisoned model behind.

Every model class carries a ``task`` class attribute (``"classifier"`` or
``"reconstruction"``) so that training and scoring code can treat custom models
registered with :func:`register_model` the same way as the built-in ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import nn

from consortium.errors import ConfigError, DataError, param_error

logger = logging.getLogger(__name__)

ModelTask = Literal["classifier", "reconstruction"]

__all__ = [
    "Autoencoder",
    "MLPClassifier",
    "ModelBuilder",
    "ModelTask",
    "available_models",
    "build_model",
    "get_parameters",
    "model_task",
    "parameter_names",
    "register_model",
    "set_parameters",
]


def _check_n_features(n_features: object, owner: str) -> int:
    if (
        isinstance(n_features, bool)
        or not isinstance(n_features, int | np.integer)
        or n_features < 1
    ):
        raise param_error("n_features", owner, "a positive integer", n_features)
    return int(n_features)


def _check_hidden(hidden: object, owner: str, *, allow_empty: bool) -> tuple[int, ...]:
    expected = "a sequence of positive integers" + ("" if allow_empty else " (at least one)")
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence | np.ndarray):
        raise param_error("hidden", owner, expected, hidden)
    sizes = tuple(hidden)
    if not allow_empty and not sizes:
        raise param_error("hidden", owner, expected, hidden)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise param_error("hidden", owner, expected, hidden)
    return tuple(int(s) for s in sizes)


class MLPClassifier(nn.Module):
    """Feed-forward binary classifier returning one logit per row.

    Hidden layers are ``Linear -> ReLU -> Dropout``; the head is a single linear
    unit.  Logits (not probabilities) are returned so that losses can use the
    numerically stable ``*_with_logits`` forms; :func:`predict_scores` applies the
    sigmoid.

    Parameters
    ----------
    n_features : int
        Width of the (standardised) input.
    hidden : Sequence[int], default (64, 32)
        Sizes of the hidden layers; empty gives logistic regression.
    dropout : float, default 0.1
        Dropout probability after every hidden layer, in ``[0, 1)``.
    """

    task: ClassVar[ModelTask] = "classifier"

    def __init__(
        self, n_features: int, *, hidden: Sequence[int] = (64, 32), dropout: float = 0.1
    ) -> None:
        super().__init__()
        owner = "MLPClassifier"
        self.n_features = _check_n_features(n_features, owner)
        self.hidden = _check_hidden(hidden, owner, allow_empty=True)
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, int | float)
            or not 0.0 <= float(dropout) < 1.0
        ):
            raise param_error("dropout", owner, "a float in [0, 1)", dropout)
        self.dropout = float(dropout)
        layers: list[nn.Module] = []
        width = self.n_features
        for size in self.hidden:
            layers.append(nn.Linear(width, size))
            layers.append(nn.ReLU())
            if self.dropout > 0.0:
                layers.append(nn.Dropout(self.dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(n,)`` for inputs of shape ``(n, n_features)``."""
        return self.layers(x).squeeze(-1)


class Autoencoder(nn.Module):
    """Symmetric fully connected autoencoder for anomaly scoring.

    The encoder maps ``n_features -> hidden[0] -> ... -> hidden[-1]`` (ReLU between
    layers, linear bottleneck) and the decoder mirrors it back to ``n_features``
    with a linear output.  Trained on normal rows only, it reconstructs normal
    behaviour well and anomalies badly, so :meth:`score` (per-row mean squared
    reconstruction error) is an anomaly score.

    Parameters
    ----------
    n_features : int
        Width of the (standardised) input.
    hidden : Sequence[int], default (32, 8)
        Encoder layer sizes; the last one is the bottleneck.
    """

    task: ClassVar[ModelTask] = "reconstruction"

    def __init__(self, n_features: int, *, hidden: Sequence[int] = (32, 8)) -> None:
        super().__init__()
        owner = "Autoencoder"
        self.n_features = _check_n_features(n_features, owner)
        self.hidden = _check_hidden(hidden, owner, allow_empty=False)
        self.encoder = _dense_stack((self.n_features, *self.hidden))
        self.decoder = _dense_stack((*reversed(self.hidden), self.n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of ``x``, shape ``(n, n_features)``."""
        return self.decoder(self.encoder(x))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row mean squared reconstruction error, shape ``(n,)``."""
        return torch.mean((self.forward(x) - x) ** 2, dim=1)


def _dense_stack(widths: Sequence[int]) -> nn.Sequential:
    """Linear layers through ``widths`` with ReLU between them, linear at the end."""
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def model_task(model: nn.Module) -> ModelTask:
    """Return how a model's output is turned into a score.

    ``"classifier"`` models output logits; ``"reconstruction"`` models output a
    reconstruction of their input.  Read from the model's ``task`` attribute;
    models without one are treated as classifiers.
    """
    task = getattr(model, "task", "classifier")
    if task == "classifier":
        return "classifier"
    if task == "reconstruction":
        return "reconstruction"
    raise ConfigError(
        f"The 'task' attribute of {type(model).__name__} must be 'classifier' or "
        f"'reconstruction'. Got {task!r} instead."
    )


class ModelBuilder(Protocol):
    """A callable building an untrained model: ``builder(n_features, *, hidden)``.

    ``hidden=None`` means "use the architecture's default".
    """

    def __call__(self, n_features: int, *, hidden: Sequence[int] | None) -> nn.Module: ...


def _build_mlp(n_features: int, *, hidden: Sequence[int] | None) -> nn.Module:
    return MLPClassifier(n_features) if hidden is None else MLPClassifier(n_features, hidden=hidden)


def _build_autoencoder(n_features: int, *, hidden: Sequence[int] | None) -> nn.Module:
    return Autoencoder(n_features) if hidden is None else Autoencoder(n_features, hidden=hidden)


# The one registry of model kinds, filled at import with the built-in kinds and
# extended only through register_model().
_BUILDERS: dict[str, ModelBuilder | Callable[..., nn.Module]] = {
    "mlp": _build_mlp,
    "autoencoder": _build_autoencoder,
}


def available_models() -> tuple[str, ...]:
    """Names accepted by :func:`build_model`, sorted."""
    return tuple(sorted(_BUILDERS))


def register_model(
    name: str, builder: ModelBuilder | Callable[..., nn.Module], *, force: bool = False
) -> None:
    """Make a new model kind available to :func:`build_model`.

    Parameters
    ----------
    name : str
        The kind's name, as used in run configurations.
    builder : callable
        ``builder(n_features, *, hidden)`` returning an ``nn.Module``.  Set a
        ``task`` attribute on the module (``"reconstruction"``) if its output is a
        reconstruction rather than logits.
    force : bool, default False
        Replace an existing kind of the same name instead of refusing.
    """
    if not isinstance(name, str) or not name.strip():
        raise param_error("name", "register_model", "a non-empty string", name)
    if not callable(builder):
        raise param_error("builder", "register_model", "a callable", builder)
    if name in _BUILDERS and not force:
        raise ConfigError(
            f"Model kind {name!r} is already registered; pass force=True to replace it."
        )
    _BUILDERS[name] = builder
    logger.debug("registered model kind %r", name)


def build_model(
    kind: str,
    n_features: int,
    *,
    hidden: Sequence[int] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a freshly initialised model, identically on every machine for a seed.

    All institutions and the coordinator must start from the same weights, so the
    initialisation is drawn from torch's CPU generator seeded with ``seed`` inside
    :func:`torch.random.fork_rng` — the caller's random state is left untouched.

    Parameters
    ----------
    kind : {"mlp", "autoencoder"} or a registered name
        Model family.
    n_features : int
        Input width.
    hidden : Sequence[int], optional
        Hidden layer sizes; ``None`` uses the family's default.
    seed : int, default 0
        Initialisation seed (non-negative).

    Raises
    ------
    ConfigError
        Unknown ``kind`` (the message lists the known kinds) or invalid sizes.
    """
    if not isinstance(kind, str) or kind not in _BUILDERS:
        raise param_error("kind", "build_model", f"one of {list(available_models())}", kind)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise param_error("seed", "build_model", "a non-negative integer", seed)
    _check_n_features(n_features, "build_model")
    if hidden is not None:
        _check_hidden(hidden, "build_model", allow_empty=True)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        model = _BUILDERS[kind](int(n_features), hidden=hidden)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"The builder registered for model kind {kind!r} must return a torch.nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    return model


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the entries exchanged by :func:`get_parameters`, in the same order."""
    return list(model.state_dict().keys())


def get_parameters(model: nn.Module) -> list[np.ndarray]:
    """Copy a model's ``state_dict`` into a list of float32 numpy arrays.

    The order is ``state_dict`` order (see :func:`parameter_names`); buffers are
    part of it when the model has any.  Arrays are copies, so later training does
    not change what was sent.
    """
    return [
        t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
        for t in model.state_dict().values()
    ]


def set_parameters(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_parameters` (or an aggregate) into a model.

    Everything is checked before anything is loaded, so on error the model is
    unchanged.

    Parameters
    ----------
    model : nn.Module
        Model to update in place.
    arrays : Sequence[np.ndarray]
        One floating-point array per ``state_dict`` entry, in that order.

    Raises
    ------
    ConfigError
        Wrong number of arrays or a shape mismatch (the architecture does not
        match); the message names the layer, the expected and the received shape.
    DataError
        An entry is not a floating-point numpy array or holds NaN/inf.
    """
    owner = "set_parameters"
    if isinstance(arrays, np.ndarray | str | bytes) or not isinstance(arrays, Sequence):
        raise param_error("arrays", owner, "a list of numpy arrays", type(arrays).__name__)
    state = model.state_dict()
    names = list(state.keys())
    if len(arrays) != len(names):
        raise ConfigError(
            f"The 'arrays' parameter of {owner} must hold {len(names)} arrays (one per "
            f"state_dict entry of {type(model).__name__}: {', '.join(names)}). "
            f"Got {len(arrays)} arrays instead."
        )
    new_state: dict[str, torch.Tensor] = {}
    for index, (name, array) in enumerate(zip(names, arrays, strict=True)):
        where = f"for layer '{name}' (index {index})"
        if not isinstance(array, np.ndarray):
            raise DataError(
                f"The 'arrays' parameter of {owner} must hold numpy arrays; {where} it "
                f"must be a numpy array. Got {type(array).__name__} instead."
            )
        if array.dtype.kind != "f":
            raise DataError(
                f"The 'arrays' parameter of {owner} must hold floating-point arrays; {where} "
                f"it must have a float dtype. Got dtype {array.dtype} instead."
            )
        expected_shape = tuple(state[name].shape)
        if array.shape != expected_shape:
            raise ConfigError(
                f"The 'arrays' parameter of {owner} must have shape {expected_shape} {where}. "
                f"Got shape {array.shape} instead."
            )
        if not np.all(np.isfinite(array)):
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise DataError(
                f"The 'arrays' parameter of {owner} must hold finite values {where}. "
                f"Got {bad} NaN/inf values instead."
            )
        new_state[name] = torch.as_tensor(array).to(dtype=state[name].dtype)
    model.load_state_dict(new_state, strict=True)
