"""Histogram gradient boosting whose only view of the data is summed histograms.

The booster never touches rows. Per tree level it asks a :class:`HistogramSource`
for the gradient/hessian/count histograms of the nodes it is about to split,
chooses every split from them (regularised gain, minimum child hessian and row
count, depth and leaf budgets) and sets leaf values ``-lr * G / (H + l2)``.
In a federation the source is the coordinator, whose histograms are the
secure-aggregated sums of the institutions' (:mod:`consortium.federation.gbdt_coordinator`);
for the centralized and local-only baselines it is :class:`LocalSource` over one
party's rows. Both run the very same growth code, which is why a plain federated
run reproduces the centralized trees exactly.

Efficiency: one request per tree level covers all nodes of the level; of two
siblings only the one with fewer rows is requested and the other is its parent
minus it; the root request of tree ``t`` also carries the validation statistics
of the first ``t - 1`` trees (score histograms per class and the weighted log
loss), which drive early stopping and the choice of how many trees to keep.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from consortium.errors import DataError, param_error
from consortium.federation.thresholds import auprc_from_histograms
from consortium.models.gbdt_binning import BinEdges
from consortium.models.gbdt_tree import Ensemble, Tree

logger = logging.getLogger(__name__)

VAL_BINS = 4000
"""Bins of the validation score histograms (uniform in log-odds over ``[-VAL_RANGE, VAL_RANGE]``)."""
VAL_RANGE = 20.0
LOSS_CAP = 32.0
"""A row's log loss is capped here so that summed losses have a known bound."""
_OWNER = "GBDTParams"


@dataclass(frozen=True)
class GBDTParams:
    """Hyperparameters of federated (and baseline) boosting.

    Attributes
    ----------
    n_trees : int
        Maximum number of trees.
    learning_rate : float
        Shrinkage of every leaf value.
    max_depth : int
        Levels per tree; also the number of histogram requests per tree.
    max_leaves : int
        Leaf budget per tree; at each level the splits with the largest gain win.
    l2 : float
        L2 regularisation of leaf values (``lambda``).
    min_child_weight : float
        Minimum summed hessian in a child.
    min_samples_leaf : int
        Minimum rows in a child (from the summed counts).
    min_gain : float
        Minimum gain for a split.
    max_bins : int
        Bins per feature from federated quantile binning.
    class_weight : {"balanced", "none"}
        ``balanced`` weights each class by ``n / (2 n_class)`` (pooled counts); the default
        ``none`` validated better on the benchmark data (docs/gbdt.md).
    early_stopping : int
        Stop when the validation metric has not improved for this many trees (0: never).
    val_metric : {"loss", "auprc"}
        Validation metric for early stopping and for the number of trees kept.
    """

    n_trees: int = 200
    learning_rate: float = 0.1
    max_depth: int = 6
    max_leaves: int = 31
    l2: float = 1.0
    min_child_weight: float = 1e-3
    min_samples_leaf: int = 20
    min_gain: float = 0.0
    max_bins: int = 128
    class_weight: Literal["balanced", "none"] = "none"
    early_stopping: int = 20
    val_metric: Literal["loss", "auprc"] = "loss"

    def __post_init__(self) -> None:
        ints = {"n_trees": 1, "max_depth": 1, "max_leaves": 2, "min_samples_leaf": 1, "max_bins": 2,
                "early_stopping": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise param_error(name, _OWNER, f"an int >= {low}", v)
        if self.max_bins > 256:
            raise param_error("max_bins", _OWNER, "an int in [2, 256]", self.max_bins)
        floats: tuple[tuple[str, float, bool], ...] = (
            ("learning_rate", 0.0, True), ("l2", 0.0, False), ("min_child_weight", 0.0, False),
            ("min_gain", 0.0, False),
        )
        for fname, flow, strict in floats:
            v = getattr(self, fname)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or (v <= flow if strict else v < flow):
                raise param_error(fname, _OWNER, f"a finite float {'>' if strict else '>='} {flow}", v)
        if self.class_weight not in ("balanced", "none"):
            raise param_error("class_weight", _OWNER, "'balanced' or 'none'", self.class_weight)
        if self.val_metric not in ("loss", "auprc"):
            raise param_error("val_metric", _OWNER, "'loss' or 'auprc'", self.val_metric)

    def class_weights(self, n: float, positives: float) -> tuple[float, float]:
        """``(w_neg, w_pos)`` from pooled counts (1, 1 without class weighting or a missing class)."""
        if self.class_weight == "none" or positives <= 0 or positives >= n:
            return 1.0, 1.0
        return n / (2.0 * (n - positives)), n / (2.0 * positives)

    def to_config(self) -> dict[str, int | float | str]:
        """Flat ``gbdt-*`` keys for Flower's run config."""
        return {f"gbdt-{k.replace('_', '-')}": v for k, v in self.__dict__.items()}

    @classmethod
    def from_config(cls, config: dict[str, object]) -> GBDTParams:
        """Read ``gbdt-*`` keys (missing keys keep their defaults)."""
        kwargs: dict[str, object] = {}
        for name, default in cls().__dict__.items():
            key = f"gbdt-{name.replace('_', '-')}"
            if key in config:
                kwargs[name] = type(default)(config[key])  # type: ignore[call-arg]
        return cls(**kwargs)  # type: ignore[arg-type]


def base_score(n: float, positives: float, w_neg: float, w_pos: float) -> float:
    """Log-odds of the weighted positive rate: the constant every tree starts from."""
    wp, wn = w_pos * positives, w_neg * (n - positives)
    if wp <= 0 or wn <= 0:
        return 0.0
    return float(np.log(wp / wn))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64))))


def gradients(margin: np.ndarray, y: np.ndarray, w_neg: float, w_pos: float) -> tuple[np.ndarray, np.ndarray]:
    """Weighted logistic-loss gradient and hessian per row."""
    p = sigmoid(margin)
    w = np.where(y == 1, w_pos, w_neg)
    return w * (p - y), np.maximum(w * p * (1.0 - p), 1e-16)


def node_histograms(
    binned: np.ndarray, g: np.ndarray, h: np.ndarray, row_node: np.ndarray, nodes: Sequence[int], *, n_bins: int
) -> np.ndarray:
    """Histograms of ``nodes``: shape ``(len(nodes), d, n_bins, 3)`` with (sum g, sum h, count)."""
    d = binned.shape[1]
    out = np.zeros((len(nodes), d, n_bins, 3), dtype=np.float64)
    if not len(nodes) or binned.shape[0] == 0:
        return out
    slot = np.full(int(max(row_node.max(initial=0), max(nodes))) + 1, -1, dtype=np.int64)
    slot[np.asarray(nodes)] = np.arange(len(nodes))
    s = slot[row_node]
    keep = s >= 0
    if not np.any(keep):
        return out
    b = binned[keep].astype(np.int64)
    idx = (s[keep, None] * d + np.arange(d)[None, :]) * n_bins + b
    flat = idx.ravel()
    size = len(nodes) * d * n_bins
    gk, hk = g[keep], h[keep]
    out[..., 0] = np.bincount(flat, weights=np.repeat(gk, d), minlength=size).reshape(len(nodes), d, n_bins)
    out[..., 1] = np.bincount(flat, weights=np.repeat(hk, d), minlength=size).reshape(len(nodes), d, n_bins)
    out[..., 2] = np.bincount(flat, minlength=size).reshape(len(nodes), d, n_bins)
    return out


def validation_stats(margin: np.ndarray, y: np.ndarray, w_neg: float, w_pos: float) -> np.ndarray:
    """``[neg histogram, pos histogram, capped weighted loss, weight]``, losses and weights scaled by
    ``1 / (LOSS_CAP * max weight)`` and ``1 / max weight`` so each term per row is at most 1
    (a known bound for secure aggregation; the mean loss is their ratio, unaffected)."""
    u = (np.clip(margin, -VAL_RANGE, VAL_RANGE) + VAL_RANGE) / (2 * VAL_RANGE)
    idx = np.minimum((u * VAL_BINS).astype(np.int64), VAL_BINS - 1)
    neg = np.bincount(idx[y == 0], minlength=VAL_BINS).astype(np.float64)
    pos = np.bincount(idx[y == 1], minlength=VAL_BINS).astype(np.float64)
    w = np.where(y == 1, w_pos, w_neg)
    # log(1 + exp(-s * margin)) with s = +-1: the logistic loss, capped.
    loss = np.minimum(np.logaddexp(0.0, -np.where(y == 1, 1.0, -1.0) * margin), LOSS_CAP)
    wmax = max(w_neg, w_pos)
    return np.concatenate([neg, pos, [float(np.sum(w * loss)) / (LOSS_CAP * wmax), float(np.sum(w)) / wmax]])


VAL_LENGTH = 2 * VAL_BINS + 2


@dataclass(frozen=True)
class ValidationPoint:
    """Federated validation after ``n_trees`` trees (from summed statistics)."""

    n_trees: int
    loss: float
    auprc: float


def read_validation(stats: np.ndarray, n_trees: int) -> ValidationPoint:
    neg, pos = stats[:VAL_BINS], stats[VAL_BINS : 2 * VAL_BINS]
    loss_sum, weight = stats[2 * VAL_BINS], stats[2 * VAL_BINS + 1]
    loss = float(loss_sum * LOSS_CAP / weight) if weight > 0 else float("nan")
    return ValidationPoint(n_trees=n_trees, loss=loss, auprc=auprc_from_histograms(neg, pos))


@dataclass(frozen=True)
class LevelRequest:
    """What the booster needs for one tree level."""

    trees: Sequence[Tree]
    """The finished trees (the ensemble so far)."""
    tree: Tree | None
    """The tree under construction (rows are routed through it to find their node)."""
    nodes: Sequence[int]
    """Leaves of ``tree`` whose histograms are needed (empty: validation only)."""
    with_validation: bool


@dataclass(frozen=True)
class LevelSums:
    """Summed answers to a :class:`LevelRequest`."""

    histograms: np.ndarray
    """``(len(nodes), d, n_bins, 3)``."""
    validation: np.ndarray | None = None


class HistogramSource(Protocol):
    """Where histograms come from: a federation (secure sums) or one party's rows."""

    def level(self, request: LevelRequest) -> LevelSums: ...


@dataclass
class BoostResult:
    """A trained ensemble and the validation curve that chose its length."""

    ensemble: Ensemble
    edges: BinEdges
    params: GBDTParams
    validation: list[ValidationPoint] = field(default_factory=list)
    best_n_trees: int = 0
    class_weights: tuple[float, float] = (1.0, 1.0)


@dataclass
class _Node:
    hist: np.ndarray  # (d, n_bins, 3)
    depth: int

    @property
    def totals(self) -> np.ndarray:
        return self.hist[0].sum(axis=0)


@dataclass(frozen=True)
class _Split:
    gain: float
    feature: int
    threshold: int
    left: np.ndarray  # (3,) G, H, count
    right: np.ndarray


def best_split(hist: np.ndarray, params: GBDTParams) -> _Split | None:
    """Best split of one node from its ``(d, n_bins, 3)`` histogram, or None."""
    tot = hist[0].sum(axis=0)
    cum = np.cumsum(hist, axis=1)[:, :-1, :]  # left side for thresholds 0..n_bins-2
    gl, hl, nl = cum[..., 0], cum[..., 1], cum[..., 2]
    gr, hr, nr = tot[0] - gl, tot[1] - hl, tot[2] - nl
    lam = params.l2
    ok = (
        (hl >= params.min_child_weight) & (hr >= params.min_child_weight)
        & (nl >= params.min_samples_leaf - 0.5) & (nr >= params.min_samples_leaf - 0.5)
    )
    if not np.any(ok):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = 0.5 * (gl**2 / (hl + lam) + gr**2 / (hr + lam) - tot[0] ** 2 / (tot[1] + lam))
    gain = np.where(ok, gain, -np.inf)
    k = int(np.argmax(gain))
    f, t = divmod(k, gain.shape[1])
    if not gain[f, t] > params.min_gain:
        return None
    return _Split(gain=float(gain[f, t]), feature=f, threshold=t, left=cum[f, t].copy(),
                  right=tot - cum[f, t])


def leaf_value(totals: np.ndarray, params: GBDTParams) -> float:
    return float(-params.learning_rate * totals[0] / (totals[1] + params.l2))


ProgressFn = Callable[[int, ValidationPoint | None], None]


def boost(
    source: HistogramSource,
    *,
    edges: BinEdges,
    params: GBDTParams,
    base: float,
    class_weights: tuple[float, float] = (1.0, 1.0),
    on_tree: ProgressFn | None = None,
) -> BoostResult:
    """Grow up to ``params.n_trees`` trees from ``source``'s histograms; keep the best prefix."""
    n_bins = params.max_bins
    trees: list[Tree] = []
    curve: list[ValidationPoint] = []
    since_best = 0
    best_score = -math.inf

    def note(point: ValidationPoint) -> None:
        nonlocal since_best, best_score
        curve.append(point)
        score = -point.loss if params.val_metric == "loss" else point.auprc
        if np.isfinite(score) and score > best_score + 1e-12:
            best_score, since_best = score, 0
        else:
            since_best += 1

    for t in range(params.n_trees):
        tree = Tree()
        nodes: dict[int, _Node] = {}
        child_totals: dict[int, np.ndarray] = {}
        frontier = [0]
        stopped = False
        for depth in range(params.max_depth):
            # Only the smaller of two siblings is summed; the other is parent minus it.
            ask, derive = _plan_level(frontier, tree, nodes, child_totals)
            sums = source.level(LevelRequest(trees=list(trees), tree=tree, nodes=ask,
                                             with_validation=depth == 0))
            _check_histograms(sums.histograms, len(ask), edges.n_features, n_bins)
            if depth == 0 and sums.validation is not None:
                note(read_validation(sums.validation, len(trees)))
                if on_tree is not None and t > 0:
                    on_tree(t, curve[-1])
                if params.early_stopping and since_best >= params.early_stopping:
                    stopped = True
                    break
            for i, node in enumerate(ask):
                nodes[node] = _Node(hist=sums.histograms[i], depth=depth)
            for node, (parent, sibling) in derive.items():
                nodes[node] = _Node(hist=nodes[parent].hist - nodes[sibling].hist, depth=depth)
            candidates = [(s, n) for n in frontier if (s := best_split(nodes[n].hist, params)) is not None]
            candidates.sort(key=lambda c: -c[0].gain)
            budget = params.max_leaves - tree.n_leaves
            frontier = []
            for split, node in candidates[:budget]:
                left, right = tree.split(node, feature=split.feature, threshold=split.threshold)
                tree.value[left], tree.value[right] = leaf_value(split.left, params), leaf_value(split.right, params)
                if depth + 1 < params.max_depth:
                    frontier += [left, right]
                child_totals[left], child_totals[right] = split.left, split.right
            if not frontier or tree.n_leaves >= params.max_leaves:
                break
        if stopped:
            break
        if tree.n_leaves == 1:
            root_totals = nodes[0].totals if 0 in nodes and nodes[0].hist.size else np.zeros(3)
            tree.value[0] = leaf_value(root_totals, params)
        trees.append(tree)
    if not stopped:
        sums = source.level(LevelRequest(trees=list(trees), tree=None, nodes=[], with_validation=True))
        if sums.validation is not None:
            note(read_validation(sums.validation, len(trees)))
            if on_tree is not None:
                on_tree(len(trees), curve[-1])
    best = _best_prefix(curve, params, len(trees))
    ensemble = Ensemble(base_score=base, trees=trees).truncated(best)
    return BoostResult(ensemble=ensemble, edges=edges, params=params, validation=curve, best_n_trees=best,
                       class_weights=class_weights)


def _plan_level(
    frontier: Sequence[int], tree: Tree, nodes: dict[int, _Node], child_totals: dict[int, np.ndarray]
) -> tuple[list[int], dict[int, tuple[int, int]]]:
    if frontier == [0]:
        return [0], {}
    parent_of = {c: p for p in range(tree.n_nodes) for c in (tree.left[p], tree.right[p]) if c >= 0}
    ask: list[int] = []
    derive: dict[int, tuple[int, int]] = {}
    done: set[int] = set()
    for node in frontier:
        if node in done:
            continue
        parent = parent_of[node]
        a, b = tree.left[parent], tree.right[parent]
        smaller, larger = (a, b) if child_totals[a][2] <= child_totals[b][2] else (b, a)
        ask.append(smaller)
        derive[larger] = (parent, smaller)
        done |= {a, b}
    return ask, derive


def _check_histograms(h: np.ndarray, n_nodes: int, d: int, n_bins: int) -> None:
    if h.shape != (n_nodes, d, n_bins, 3):
        raise DataError(f"Histogram sums have shape {h.shape}; expected {(n_nodes, d, n_bins, 3)}.")
    if not np.all(np.isfinite(h)):
        raise DataError("Histogram sums contain NaN or infinite values.")


def _best_prefix(curve: Sequence[ValidationPoint], params: GBDTParams, n_trees: int) -> int:
    scored = [(p.n_trees, -p.loss if params.val_metric == "loss" else p.auprc) for p in curve]
    scored = [(n, s) for n, s in scored if np.isfinite(s) and n <= n_trees]
    if not scored:
        return n_trees
    best = max(s for _, s in scored)
    return min(n for n, s in scored if s >= best - 1e-12)


# --------------------------------------------------------------------------- one party's rows


@dataclass
class PartyData:
    """One party's binned rows and the running margins of the trees applied so far."""

    binned: np.ndarray
    y: np.ndarray
    binned_val: np.ndarray
    y_val: np.ndarray
    margin: np.ndarray
    margin_val: np.ndarray
    n_applied: int = 0

    @classmethod
    def create(cls, edges: BinEdges, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,  # noqa: N803
               *, base: float) -> PartyData:
        return cls(binned=edges.transform(X), y=np.asarray(y, dtype=np.float64), binned_val=edges.transform(X_val),
                   y_val=np.asarray(y_val, dtype=np.float64), margin=np.full(len(y), base, dtype=np.float64),
                   margin_val=np.full(len(y_val), base, dtype=np.float64))

    def catch_up(self, trees: Sequence[Tree]) -> None:
        """Add the trees this party has not applied yet to its margins."""
        for tree in trees[self.n_applied :]:
            self.margin += tree.predict_binned(self.binned)
            self.margin_val += tree.predict_binned(self.binned_val)
        self.n_applied = max(self.n_applied, len(trees))

    def answer(self, request: LevelRequest, *, n_bins: int, w_neg: float, w_pos: float) -> LevelSums:
        """This party's share of the sums of one level request."""
        self.catch_up(request.trees)
        if request.nodes and request.tree is not None:
            g, h = gradients(self.margin, self.y, w_neg, w_pos)
            row_node = request.tree.apply(self.binned)
            hist = node_histograms(self.binned, g, h, row_node, request.nodes, n_bins=n_bins)
        else:
            hist = np.zeros((len(request.nodes), self.binned.shape[1], n_bins, 3))
        val = validation_stats(self.margin_val, self.y_val, w_neg, w_pos) if request.with_validation else None
        return LevelSums(histograms=hist, validation=val)


@dataclass
class LocalSource:
    """A :class:`HistogramSource` over one party's rows (baselines, tests)."""

    data: PartyData
    n_bins: int
    w_neg: float
    w_pos: float

    def level(self, request: LevelRequest) -> LevelSums:
        sums = self.data.answer(request, n_bins=self.n_bins, w_neg=self.w_neg, w_pos=self.w_pos)
        return sums


def check_training_data(X: np.ndarray, y: np.ndarray, *, name: str = "training data") -> tuple[np.ndarray, np.ndarray]:
    """Numeric finite 2-D features and 0/1 labels, or a :class:`DataError` naming the problem."""
    Xa = np.asarray(X)  # noqa: N806
    if Xa.dtype.kind not in "biuf":
        raise DataError(f"{name}: features must be numeric; got dtype {Xa.dtype} (categorical strings must be "
                        "encoded as numbers before boosting, e.g. one-hot or ordinal codes).")
    if Xa.ndim != 2:
        raise DataError(f"{name}: features must be a 2-D matrix; got shape {Xa.shape}.")
    if not np.all(np.isfinite(Xa)):
        raise DataError(f"{name}: features contain NaN or infinite values; impute them first.")
    ya = np.asarray(y)
    if ya.shape != (Xa.shape[0],) or not np.all(np.isin(ya, (0, 1))):
        raise DataError(f"{name}: labels must be {Xa.shape[0]} values in {{0, 1}}; got shape {ya.shape}.")
    return Xa.astype(np.float32), ya.astype(np.int64)


def fit_local(
    X: np.ndarray,  # noqa: N803
    y: np.ndarray,
    X_val: np.ndarray,  # noqa: N803
    y_val: np.ndarray,
    *,
    params: GBDTParams,
    edges: BinEdges | None = None,
) -> BoostResult:
    """Boost on one party's rows with the federated code path (centralized / local-only baselines)."""
    from consortium.models.gbdt_binning import local_edges  # noqa: PLC0415

    X, y = check_training_data(X, y)  # noqa: N806
    X_val, y_val = check_training_data(X_val, y_val, name="validation data")  # noqa: N806
    edges = edges or local_edges(X, max_bins=params.max_bins)
    w_neg, w_pos = params.class_weights(float(len(y)), float(y.sum()))
    base = base_score(float(len(y)), float(y.sum()), w_neg, w_pos)
    data = PartyData.create(edges, X, y, X_val, y_val, base=base)
    source = LocalSource(data=data, n_bins=params.max_bins, w_neg=w_neg, w_pos=w_pos)
    return boost(source, edges=edges, params=params, base=base, class_weights=(w_neg, w_pos))


def predict_proba(result: BoostResult | Ensemble, X: np.ndarray, *, edges: BinEdges | None = None) -> np.ndarray:  # noqa: N803
    """Fraud probability of raw rows."""
    ens = result.ensemble if isinstance(result, BoostResult) else result
    e = result.edges if isinstance(result, BoostResult) else edges
    if e is None:
        raise param_error("edges", "predict_proba", "BinEdges when an Ensemble is given", None)
    return sigmoid(ens.predict_margin_binned(e.transform(X)))
