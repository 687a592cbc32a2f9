"""The tree over key positions and its descent towards high attention scores.

The L positions (L a power of two) are the leaves of a perfect binary tree in heap numbering: node i has children
2i + 1 and 2i + 2, level floor(log2(i + 1)), and covers the positions [j s, (j + 1) s) with s = L / 2^level and j its
index in its level; leaf of position p is L - 1 + p. Every node keeps additive summaries of the keys under it that
a query may read: count, sum of keys, sum of values, and the sum of the mass estimator's key features.

Two stores give the same summaries: :class:`HeapSummaries` (arrays over the 2L - 1 nodes, updated on the
leaf-to-root path when a token is inserted: the incremental form of the report) and :class:`PrefixSummaries`
(differences of cumulative sums over positions, clipped at each query's position t: a whole causal sequence at
once, never touching a key after t).

Descent (:func:`descend`), for a query at position t with l = t + 1 visible keys: the buds start as the P nodes of
level log2(P); each round samples up to P non-leaf buds without replacement in proportion to their estimated mass
pm (``mass_estimators.py``; Gumbel-top-P sampling) and replaces each by its children (an empty right child, beyond
t, is dropped), until there are T = ceil(l^e) buds or only leaves are left. All heads share the descent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.attention import gather_rows


def node_level(nodes: torch.Tensor) -> torch.Tensor:
    return torch.log2((nodes + 1).double()).floor().long()


def node_span(nodes: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, stop) positions covered by each node."""
    level = node_level(nodes)
    size = L >> level
    start = (nodes + 1 - (1 << level)) * size
    return start, start + size


@dataclass
class Summaries:
    """Of buds (B, n, c): count/start/stop (B, n, c) clipped to the prefix; sum_k, sum_v (B, H, n, c, D);
    sum_feat (B, H, n, c, F) or None."""
    count: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    sum_k: torch.Tensor
    sum_v: torch.Tensor
    sum_feat: torch.Tensor | None


class PrefixSummaries:
    """Summaries from cumulative sums over positions: node sums restricted to positions <= t of each query."""

    def __init__(self, k, v, feats, L: int, positions: torch.Tensor):
        pad = lambda x: torch.nn.functional.pad(x.cumsum(2), (0, 0, 1, 0))  # C[p] = sum of the first p rows
        self.ck, self.cv = pad(k), pad(v)
        self.cf = None if feats is None else pad(feats)
        self.L, self.positions, self.heads = L, positions, k.shape[1]

    def __call__(self, nodes: torch.Tensor) -> Summaries:
        start, stop = node_span(nodes, self.L)
        limit = (self.positions + 1).view(1, -1, 1)
        a, b = torch.minimum(start, limit), torch.minimum(stop, limit)
        ia, ib = (x.unsqueeze(1).expand(-1, self.heads, -1, -1) for x in (a, b))
        diff = lambda c: gather_rows(c, ib) - gather_rows(c, ia)
        return Summaries(b - a, a, b, diff(self.ck), diff(self.cv), None if self.cf is None else diff(self.cf))


class HeapSummaries:
    """Arrays of node summaries over the heap; ``insert`` adds a token to the nodes on its leaf-to-root path."""

    def __init__(self, L: int, heads: int, head_dim: int, value_dim: int, feat_dim: int | None, dtype=torch.float64):
        n_nodes = 2 * L - 1
        self.L, self.length = L, 0
        self.count = torch.zeros(n_nodes, dtype=torch.long)
        self.sum_k = torch.zeros(heads, n_nodes, head_dim, dtype=dtype)
        self.sum_v = torch.zeros(heads, n_nodes, value_dim, dtype=dtype)
        self.sum_feat = None if feat_dim is None else torch.zeros(heads, n_nodes, feat_dim, dtype=dtype)

    def path(self, position: int) -> list[int]:
        node, nodes = self.L - 1 + position, []
        while node >= 0:
            nodes.append(node)
            node = (node - 1) // 2 if node else -1
        return nodes

    def insert(self, k: torch.Tensor, v: torch.Tensor, feat: torch.Tensor | None) -> None:
        """Add the next token (k: (H, D), v: (H, Dv), feat: (H, F)) at position ``length``."""
        if self.length >= self.L:
            raise ValueError(f"tree: the tree holds L={self.L} positions; cannot insert position {self.length}")
        nodes = torch.tensor(self.path(self.length))
        self.count[nodes] += 1
        self.sum_k[:, nodes] += k.unsqueeze(1)
        self.sum_v[:, nodes] += v.unsqueeze(1)
        if feat is not None:
            self.sum_feat[:, nodes] += feat.unsqueeze(1)
        self.length += 1

    def __call__(self, nodes: torch.Tensor) -> Summaries:  # nodes (1, 1, c)
        start, stop = node_span(nodes, self.L)
        stop = torch.minimum(stop, torch.full_like(stop, self.length))
        start = torch.minimum(start, stop)
        pick = lambda arr: arr[:, nodes[0, 0]].unsqueeze(0).unsqueeze(2)  # (1, H, 1, c, F)
        return Summaries(self.count[nodes], start, stop, pick(self.sum_k), pick(self.sum_v),
                         None if self.sum_feat is None else pick(self.sum_feat))


def descend(summaries, estimator, q: torch.Tensor, positions: torch.Tensor, n_terms: torch.Tensor, L: int, P: int,
            generator: torch.Generator, verbose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Buds (B, n, cap) (node ids, -1 = none) of each query after the descent, and the number of expanded nodes.

    q: (B, H, n, D); positions: (n,) the query positions t; n_terms: (n,) T = ceil((t + 1)^e).
    """
    b, _, n, _ = q.shape
    depth = int(math.log2(L))
    cap = int(n_terms.max()) + P + depth + 1
    buds = torch.full((b, n, cap + 1), -1, dtype=torch.long)  # the last column is a sink for unused writes
    first = (P - 1) + torch.arange(P)
    buds[:, :, :P] = first
    start, _ = node_span(first, L)
    buds[:, :, :P] = buds[:, :, :P].masked_fill(start.view(1, 1, P) > positions.view(1, n, 1), -1)
    used = torch.full((b, n), P, dtype=torch.long)
    expanded = torch.zeros((b, n), dtype=torch.long)
    target = n_terms.view(1, n).expand(b, n)
    while True:
        nodes = buds[:, :, :cap].clone()
        live = nodes >= 0
        eligible = live & (node_level(nodes.clamp_min(0)) < depth)
        need = (target - live.sum(-1)).clamp_min(0)
        active = (need > 0) & eligible.any(-1)
        if not active.any():
            return nodes, expanded
        s = summaries(nodes.clamp_min(0))
        log_pm = estimator.log_mass(q, s.sum_k, s.sum_feat, s.count, s.start, s.stop, positions)
        log_pm = log_pm.masked_fill(~eligible, float("-inf"))
        stalled = eligible.any(-1, keepdim=True) & ~torch.isfinite(log_pm).any(-1, keepdim=True)
        log_pm = torch.where(stalled & eligible, torch.zeros_like(log_pm), log_pm)  # all pm 0: uniform
        u = torch.rand(log_pm.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        keys = log_pm.double() - torch.log(-torch.log(u))
        top_keys, slots = keys.topk(min(P, cap), dim=-1)
        m = torch.minimum(need, torch.full_like(need, P)) * active
        chosen = torch.isfinite(top_keys) & (torch.arange(slots.shape[-1]) < m.unsqueeze(-1))
        parent = torch.gather(nodes, -1, slots)
        left, right = 2 * parent + 1, 2 * parent + 2
        right_start, _ = node_span(right, L)
        right = right.masked_fill(right_start > positions.view(1, n, 1), -1)  # beyond t: empty
        buds.scatter_(-1, slots, torch.where(chosen, left, parent))
        rank = chosen.long().cumsum(-1) - 1
        target_slot = torch.where(chosen, used.unsqueeze(-1) + rank, torch.full_like(rank, cap))
        buds.scatter_(-1, target_slot, torch.where(chosen, right, -1))
        buds[:, :, cap] = -1
        n_chosen = chosen.sum(-1)
        used += n_chosen
        expanded += n_chosen
        if verbose:
            _print_round(nodes[0, 0], s, log_pm[0, 0], parent[0, 0][chosen[0, 0]], buds[0, 0, :cap], q)


def _print_round(nodes, s, log_pm, expanded_nodes, new_buds, q):
    live = nodes >= 0
    align = torch.einsum("hd,hcd->hc", q[0, :, 0], s.sum_k[0, :, 0]) / s.count[0, 0].clamp_min(1)  # (H, c)
    pm = torch.exp(log_pm - log_pm.max()) if torch.isfinite(log_pm).any() else torch.zeros_like(log_pm)
    pm = pm / pm.sum().clamp_min(1e-300)
    print(f"buds: {nodes[live].tolist()}")
    print(f"  alignments (head 0, q . mean key): {[round(x, 3) for x in align[0][live].tolist()]}")
    print(f"  normalised pm: {[round(x, 3) for x in pm[live].tolist()]}")
    for node in expanded_nodes.tolist():
        print(f"  sampled bud {node}: expanded -> children {2 * node + 1}, {2 * node + 2}")
    print(f"  new buds: {new_buds[new_buds >= 0].tolist()}")


def combine(q: torch.Tensor, s: Summaries, valid: torch.Tensor, scale: float, bud_value: str) -> torch.Tensor:
    """The output per head from the buds' summaries.

    ``report``: softmax over buds of S q . mean key, times the buds' value sums (the original's combination);
    ``count``: each bud weighted by count * exp(S q . mean key), times its mean value; with every bud a leaf this
    is exact softmax attention.
    """
    count = s.count.clamp_min(1).unsqueeze(1).to(q.dtype)  # (B, 1, n, c)
    score = scale * torch.einsum("bhnd,bhncd->bhnc", q, s.sum_k) / count
    valid = valid.unsqueeze(1)
    if bud_value == "report":
        weights = torch.softmax(score.masked_fill(~valid, float("-inf")), -1)
        return torch.einsum("bhnc,bhncv->bhnv", weights, s.sum_v)
    weights = torch.softmax((score + torch.log(count)).masked_fill(~valid, float("-inf")), -1)
    return torch.einsum("bhnc,bhncv->bhnv", weights, s.sum_v / count.unsqueeze(-1))
