"""Server-side update rules: how the global model moves given the mean update.

Secure aggregation hands the coordinator one thing per round, the weighted mean
of the institutions' model deltas.  Every strategy here is a rule that turns
that mean delta into the next global model, so all of them work unchanged under
secure aggregation (FedProx differs from FedAvg only on the clients).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from consortium.errors import ConfigError, param_error
from consortium.federation.config import FederationConfig


class ServerOptimizer(ABC):
    """Turns ``(global params, mean delta)`` into new global params."""

    name: str = "base"

    @abstractmethod
    def step(self, params: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Return the next global parameters (same dtypes and shapes as ``params``)."""

    def state_arrays(self) -> list[np.ndarray]:
        """Internal state to checkpoint (empty for stateless rules)."""
        return []

    def load_state_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        """Restore what :meth:`state_arrays` returned."""
        if arrays:
            raise ConfigError(f"{type(self).__name__} has no state, got {len(arrays)} arrays.")


class FedAvg(ServerOptimizer):
    """``w <- w + server_lr * mean_delta`` (McMahan et al., 2017 with server_lr = 1)."""

    name = "fedavg"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise param_error("server_lr", "FedAvg", "a float > 0", server_lr)
        self.server_lr = server_lr

    def step(self, params: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        _check_shapes(params, mean_delta)
        return [(p + self.server_lr * d).astype(p.dtype) for p, d in zip(params, mean_delta, strict=True)]


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019): ``v = beta v + d``, ``w += server_lr * v``.

    Momentum accumulates the consistent part of successive mean updates, which
    speeds up training when institutions' data differ (non-IID).
    """

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if not server_lr > 0:
            raise param_error("server_lr", "FedAvgM", "a float > 0", server_lr)
        if not 0 <= momentum < 1:
            raise param_error("momentum", "FedAvgM", "a float in [0, 1)", momentum)
        self.server_lr, self.momentum = server_lr, momentum
        self._v: list[np.ndarray] = []

    def step(self, params: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        _check_shapes(params, mean_delta)
        if not self._v:
            self._v = [np.zeros_like(p, dtype=np.float64) for p in params]
        out = []
        for i, (p, d) in enumerate(zip(params, mean_delta, strict=True)):
            self._v[i] = self.momentum * self._v[i] + np.asarray(d, dtype=np.float64)
            out.append((p + self.server_lr * self._v[i]).astype(p.dtype))
        return out

    def state_arrays(self) -> list[np.ndarray]:
        return list(self._v)

    def load_state_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        self._v = [np.asarray(a, dtype=np.float64) for a in arrays]


class FedAdam(ServerOptimizer):
    """Adaptive server optimiser of Reddi et al., "Adaptive Federated Optimization" (2021).

    The mean delta is treated as a pseudo-gradient step:
    ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``, ``w += lr * m / (sqrt(v) + tau)``.
    """

    name = "fedadam"

    def __init__(
        self, *, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if not server_lr > 0:
            raise param_error("server_lr", "FedAdam", "a float > 0", server_lr)
        if not 0 <= beta1 < 1:
            raise param_error("beta1", "FedAdam", "a float in [0, 1)", beta1)
        if not 0 <= beta2 < 1:
            raise param_error("beta2", "FedAdam", "a float in [0, 1)", beta2)
        if not tau > 0:
            raise param_error("tau", "FedAdam", "a float > 0", tau)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self._m: list[np.ndarray] = []
        self._v: list[np.ndarray] = []

    def step(self, params: Sequence[np.ndarray], mean_delta: Sequence[np.ndarray]) -> list[np.ndarray]:
        _check_shapes(params, mean_delta)
        if not self._m:
            self._m = [np.zeros_like(p, dtype=np.float64) for p in params]
            self._v = [np.zeros_like(p, dtype=np.float64) for p in params]
        out = []
        for i, (p, d) in enumerate(zip(params, mean_delta, strict=True)):
            d64 = np.asarray(d, dtype=np.float64)
            self._m[i] = self.beta1 * self._m[i] + (1 - self.beta1) * d64
            self._v[i] = self.beta2 * self._v[i] + (1 - self.beta2) * d64 * d64
            out.append((p + self.server_lr * self._m[i] / (np.sqrt(self._v[i]) + self.tau)).astype(p.dtype))
        return out

    def state_arrays(self) -> list[np.ndarray]:
        return [*self._m, *self._v]

    def load_state_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        if len(arrays) % 2:
            raise ConfigError(f"FedAdam state must hold m and v arrays, got {len(arrays)} arrays.")
        half = len(arrays) // 2
        self._m = [np.asarray(a, dtype=np.float64) for a in arrays[:half]]
        self._v = [np.asarray(a, dtype=np.float64) for a in arrays[half:]]


def _check_shapes(params: Sequence[np.ndarray], delta: Sequence[np.ndarray]) -> None:
    if len(params) != len(delta):
        raise ConfigError(
            f"The mean update has {len(delta)} tensors but the global model has {len(params)}."
        )
    for i, (p, d) in enumerate(zip(params, delta, strict=True)):
        if p.shape != np.shape(d):
            raise ConfigError(
                f"Tensor {i} of the mean update has shape {np.shape(d)}; expected {p.shape}."
            )


_BUILDERS: dict[str, Callable[[FederationConfig], ServerOptimizer]] = {
    "fedavg": lambda c: FedAvg(server_lr=c.server_lr),
    "fedprox": lambda c: FedAvg(server_lr=c.server_lr),
    "fedavgm": lambda c: FedAvgM(server_lr=c.server_lr, momentum=c.server_momentum),
    "fedadam": lambda c: FedAdam(
        server_lr=c.adam_lr, beta1=c.adam_beta1, beta2=c.adam_beta2, tau=c.adam_tau
    ),
}


def create_server_optimizer(config: FederationConfig) -> ServerOptimizer:
    """The optimiser named by ``config.strategy``; an unknown name lists the known ones."""
    try:
        return _BUILDERS[config.strategy](config)
    except KeyError:
        raise param_error(
            "strategy", "create_server_optimizer", f"one of {sorted(_BUILDERS)}", config.strategy
        ) from None
