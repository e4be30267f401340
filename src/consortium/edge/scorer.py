"""Score transactions with an ONNX model through ONNX Runtime, one row at a time, fast.

The bundle's ONNX graph carries its own preprocessing (feature order,
standardisation, missing values), so scoring is: put the row's feature values
in the graph's input order into a pre-allocated float32 array, run, read one
float.  The single-row path uses an I/O binding whose input and output buffers
are bound once, so ``run`` allocates nothing and copies nothing: measured on
these machines it is *faster* than a plain ``InferenceSession.run`` call
(``benchmarks/results/edge_latency.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from consortium.errors import ConfigError, param_error


class OnnxScorer:
    """An ONNX Runtime session scoring rows in a fixed feature order.

    Parameters
    ----------
    onnx_model : bytes
        Serialised ONNX model with one float input ``[N, d]`` and one score output ``[N]`` or ``[N, 1]``.
    feature_names : sequence of str
        The ``d`` input features in graph order (the bundle manifest's ``features``).
    input_name, output_name : str, optional
        Graph input/output to use; default the graph's first.
    intra_op_threads : int
        ONNX Runtime intra-op threads (1: latency is what matters, and the machine is shared).
    """

    def __init__(
        self,
        onnx_model: bytes,
        *,
        feature_names: Sequence[str],
        input_name: str | None = None,
        output_name: str | None = None,
        intra_op_threads: int = 1,
    ) -> None:
        if intra_op_threads < 1:
            raise param_error("intra_op_threads", "OnnxScorer", "an integer >= 1", intra_op_threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad model
            raise ConfigError(f"ONNX Runtime cannot load the model: {exc}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = input_name or next(iter(inputs))
        self.output_name = output_name or outputs[0]
        if self.input_name not in inputs:
            raise param_error("input_name", "OnnxScorer", f"one of the graph's inputs {sorted(inputs)}", input_name)
        if self.output_name not in outputs:
            raise param_error("output_name", "OnnxScorer", f"one of the graph's outputs {outputs}", output_name)
        shape = inputs[self.input_name].shape
        self.feature_names: tuple[str, ...] = tuple(feature_names)
        width = shape[-1] if shape and isinstance(shape[-1], int) else None
        if width is not None and width != len(self.feature_names):
            raise ConfigError(
                f"The model's input {self.input_name!r} takes {width} features, "
                f"but {len(self.feature_names)} feature names were given."
            )
        self.n_features = len(self.feature_names)
        # Pre-bound single-row buffers: run_with_iobinding reads _x and writes _y in place.
        self._x = np.zeros((1, self.n_features), dtype=np.float32)
        out_rank = len(self.session.get_outputs()[outputs.index(self.output_name)].shape or [0, 0])
        self._y = np.zeros((1, 1) if out_rank >= 2 else (1,), dtype=np.float32)
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(self.input_name, self._x)
        self._binding.bind_output(self.output_name, "cpu", 0, np.float32, list(self._y.shape), self._y.ctypes.data)
        self._run = self.session.run_with_iobinding
        self._y_flat = self._y.reshape(-1)

    @property
    def row(self) -> np.ndarray:
        """The pre-bound input row ``[1, d]`` of the last :meth:`score_values` call (overwritten by the next)."""
        return self._x

    def score_values(self, values: Sequence[float]) -> float:
        """Score one row given as ``d`` numbers in feature order (the hot path; not thread-safe)."""
        self._x[0] = values
        self._run(self._binding)
        return float(self._y_flat[0])

    def score_batch(self, X: np.ndarray) -> np.ndarray:
        """Score an ``[n, d]`` array; returns ``n`` float32 scores."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise param_error("X", "OnnxScorer.score_batch", f"an array of shape [n, {self.n_features}]", X.shape)
        out = self.session.run([self.output_name], {self.input_name: X})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)
