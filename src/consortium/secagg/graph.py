"""The public neighbour graph of SecAgg+ (Bell et al., CCS 2020).

Each participant shares masks and secret shares only with ``k = O(log n)``
neighbours instead of everybody, which is what brings the cost per round from
``O(n^2)`` to ``O(n log n)``. The graph is a Harary graph over a pseudo-random
ring order derived from a public seed: every party (coordinator and each
institution) computes the same graph from ``(node_ids, k, seed)``, and the
coordinator cannot choose a participant's neighbours.

A participant's *holders* are its neighbours plus itself: they receive the
Shamir shares of its self-mask seed and of its mask private key, so secrets are
recoverable from any ``threshold`` holders. With ``n <= k + 1`` the graph is
complete.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from consortium.errors import param_error

MAX_NODE_ID = 2**64 - 1


def default_neighbours(n: int) -> int:
    """``k = min(n - 1, 2 * ceil(log2 n) + 1)``: logarithmic degree (Bell et al., sec. 4)."""
    if n < 2:
        raise param_error("n", "default_neighbours", "an int >= 2", n)
    return min(n - 1, 2 * math.ceil(math.log2(n)) + 1)


def default_threshold(holders: int) -> int:
    """Smallest majority of the holders, ``holders // 2 + 1``.

    A threshold above half of the holders means no two disjoint groups of
    holders can each reach it, which is what keeps an active coordinator from
    obtaining both kinds of shares for the same participant.
    """
    return holders // 2 + 1


@dataclass(frozen=True)
class NeighbourGraph:
    """Neighbours of every participant (sorted node ids, symmetric relation).

    Attributes
    ----------
    node_ids : tuple of int
        All participants, sorted ascending.
    k : int
        Effective degree of every node (may be one more than requested, see
        :func:`build_graph`).
    neighbours : Mapping[int, tuple[int, ...]]
        Sorted neighbour ids of each node (the node itself excluded).
    """

    node_ids: tuple[int, ...]
    k: int
    neighbours: Mapping[int, tuple[int, ...]]

    def of(self, node: int) -> tuple[int, ...]:
        """Neighbours of ``node`` (itself excluded)."""
        return self.neighbours[node]

    def holders(self, node: int) -> tuple[int, ...]:
        """Share holders of ``node``: its neighbours and itself, sorted."""
        return tuple(sorted((*self.neighbours[node], node)))

    def x_of(self, node: int) -> int:
        """Shamir evaluation point of ``node``: its 1-based rank among all node ids."""
        return self.node_ids.index(node) + 1


def _validated(node_ids: Sequence[int], k: int, seed: bytes, owner: str) -> list[int]:
    ids = sorted(int(i) for i in node_ids)
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise param_error("node_ids", owner, "at least 2 distinct ids", list(node_ids))
    if ids[0] < 0 or ids[-1] > MAX_NODE_ID:
        raise param_error("node_ids", owner, "ids in [0, 2**64)", (ids[0], ids[-1]))
    if not isinstance(k, int) or k < 1:
        raise param_error("k", owner, "an int >= 1", k)
    if not isinstance(seed, bytes) or len(seed) < 16:
        raise param_error("seed", owner, "at least 16 bytes", seed)
    return ids


def _effective_k(n: int, k: int) -> int:
    if k >= n - 1:
        return n - 1
    return k + 1 if k % 2 == 1 and n % 2 == 1 else k


def _ring(ids: Sequence[int], seed: bytes) -> list[int]:
    return sorted(ids, key=lambda u: hashlib.sha256(seed + u.to_bytes(8, "big")).digest())


def build_graph(node_ids: Sequence[int], *, k: int, seed: bytes) -> NeighbourGraph:
    """Harary graph ``H(k, n)`` on a ring ordered by ``SHA-256(seed || node_id)``.

    Each node is joined to the ``k // 2`` nearest nodes on either side of the
    ring; for odd ``k`` and even ``n`` also to the opposite node; for odd ``k``
    and odd ``n`` (where no ``k``-regular graph exists) ``k + 1`` is used.
    With ``k >= n - 1`` the graph is complete.

    Parameters
    ----------
    node_ids : sequence of int
        Distinct participant ids in ``[0, 2**64)``.
    k : int
        Requested degree, ``1 <= k``.
    seed : bytes
        Public per-round seed chosen by the coordinator (>= 16 bytes).
    """
    ids = _validated(node_ids, k, seed, "build_graph")
    n = len(ids)
    k = _effective_k(n, k)
    if k == n - 1:
        nbrs = {u: tuple(v for v in ids if v != u) for u in ids}
        return NeighbourGraph(node_ids=tuple(ids), k=k, neighbours=nbrs)
    ring = _ring(ids, seed)
    adj: dict[int, set[int]] = {u: set() for u in ids}
    for pos, u in enumerate(ring):
        for step in range(1, k // 2 + 1):
            v = ring[(pos + step) % n]
            adj[u].add(v)
            adj[v].add(u)
        if k % 2 == 1:
            v = ring[(pos + n // 2) % n]
            adj[u].add(v)
            adj[v].add(u)
    return NeighbourGraph(node_ids=tuple(ids), k=k, neighbours={u: tuple(sorted(adj[u])) for u in ids})


def neighbours_of(node_ids: Sequence[int], *, k: int, seed: bytes, node: int) -> tuple[int, tuple[int, ...]]:
    """``(effective k, build_graph(node_ids, k=k, seed=seed).of(node))`` without building the whole graph.

    A participant only needs its own row of the public graph: the ``k // 2``
    ring positions on either side of it (and the opposite one for odd ``k``),
    which costs ``O(n)`` hashes instead of ``O(n k)`` set operations.
    """
    ids = _validated(node_ids, k, seed, "neighbours_of")
    n = len(ids)
    k = _effective_k(n, k)
    if node not in ids:
        raise param_error("node", "neighbours_of", "one of the node ids", node)
    if k == n - 1:
        return k, tuple(v for v in ids if v != node)
    ring = _ring(ids, seed)
    pos = ring.index(node)
    nbrs = {ring[(pos + step) % n] for step in range(1, k // 2 + 1)}
    nbrs |= {ring[(pos - step) % n] for step in range(1, k // 2 + 1)}
    if k % 2 == 1:  # then n is even and the opposite node is joined from both sides
        nbrs.add(ring[(pos + n // 2) % n])
    return k, tuple(sorted(nbrs))


def check_threshold(threshold: int, *, holders: int) -> int:
    """Validate a reconstruction threshold for ``holders`` share holders per node.

    Raises
    ------
    ConfigError
        Unless ``holders / 2 < threshold <= holders`` and ``threshold >= 2``.
    """
    if not isinstance(threshold, int) or threshold < 2 or threshold > holders or 2 * threshold <= holders:
        raise param_error(
            "threshold",
            "secure aggregation",
            f"an int t with 2 <= t <= {holders} (holders per node = neighbours + 1) and "
            f"t > {holders}/2 (a majority, so that an active coordinator cannot collect both "
            "kinds of shares of one node)",
            threshold,
        )
    return threshold
