"""The tree over key positions and its descent towards high attention scores.

The L positions (L a power of two) are the leaves of a perfect binary tree in heap numbering: node i has children
2i + 1 and 2i + 2, level floor(log2(i + 1)), and covers the positions [j s, (j + 1) s) with s = L / 2^level and j its
index in its level; leaf of position p is L - 1 + p. Every node keeps additive summaries of the keys under it that
a query may read: count, sum of keys, sum of values, and the sum of the mass estimator's key features.

Two stores give the same summaries: :class:`HeapSummaries` (arrays over the 2L - 1 nodes, updated on the
leaf-to-root path when a token is inserted: the incremental form of the report) and :class:`PrefixSummaries`
(differences of cumulative sums over positions, clipped at each query's position t: a whole causal sequence at
once, never touching a key after t).

Descent (:func:`descend`), for a query at position t with l = t + 1 visible keys: the buds start as the (at most)
P nodes of the level that covers the prefix, i.e. the level whose nodes hold 2^ceil(log2 l) / P positions (the
leaves when 2^ceil(log2 l) < P), those that hold a visible key; each round samples up to P buds without
replacement in proportion to their estimated mass pm (``mass_estimators.py``; Gumbel-top-P sampling; once the buds
with pm > 0 run out within a round, the rest are drawn uniformly among the buds with pm 0, as the original's 1e-10
added to every pm does) and replaces each by its children (an empty right child, beyond t, is dropped: the left
child takes the parent's place), until there are T = ceil(l^e) buds or every bud is final. A bud holding a single
visible key (a leaf, or a node whose other keys lie beyond t) has pm 0 and is final. All heads share the descent.
Two round rules (``expansions``): 'needed' (ours, the default) expands min(P, T - buds) buds, so a query ends with
exactly T buds (or all its l leaves); 'P' (the report's code) expands P buds per round while there are fewer than
T, so it ends with T to T + P - 1 buds.

Rounds are bounded per query (:func:`round_bound`, with its proof): at most floor((T - s0) / P) + E + d + 1, d the
levels below the starting level, s0 the starting buds, E <= d - 1 the nodes on the path to t whose right child is
empty (a round that expands min(need, P) buds adds that many minus those; a round with fewer eligible buds than it
needs expands all of them, so the shallowest eligible bud goes down one level, at most d times), whatever the
estimates. At T = 363, P = 16, L = 2^17 that is 46 rounds for the last block of queries (the earlier, looser bound
ceil((T + log2 L) / P) + 2 log2 L + 2 gave 60); a descent ends after about T / P + a few. The loop runs over
rounds (levels), batched over the batch and the queries with tensor ops on the inputs' device. Host reads:
``early_exit`` stops the loop once no query needs another round, one boolean read per round (3-4x fewer rounds;
on by default for CPU tensors only, where the read is no synchronisation); without it the bound's rounds run and
nothing is read (the default on a GPU). The rounds after a query is done change none of its buds, so both give
the same buds. Round r works on the first min(T + P, P (r + 1)) bud columns only (a round adds at most P buds),
about half the (query, bud) pairs of working on all T + P columns every round.

Inner products. The report keeps each bud's alignment q . sum_k: a starting bud costs one inner product, and an
expansion costs one (the right child's; the left child's alignment is the parent's minus the right child's; an
expansion with an empty right child costs none). :func:`descend` counts these per query, which is the cost of the
report's incremental algorithm, and the vectorised path below does exactly these (batched over the batch, the
queries and the heads): it keeps each bud's inner product and gathers only the P right children per round. The
final combination (:func:`combine`) reads the T buds' key and value sums once more, so that autograd sees it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from common.attention import gather_rows
from common.validation import NonFiniteError


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2 x) of integers x >= 1, exactly on every device (the binary exponent; a float log2 of a power of
    two may round below it on a GPU)."""
    return torch.frexp(x.double()).exponent.long() - 1


def node_level(nodes: torch.Tensor) -> torch.Tensor:
    return floor_log2(nodes + 1)


def node_span(nodes: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, stop) positions covered by each node."""
    level = node_level(nodes)
    size = L >> level
    start = (nodes + 1 - (1 << level)) * size
    return start, start + size


@dataclass
class Summaries:
    """Of buds (B, n, c): count/start/stop (B, n, c) clipped to the prefix; sum_k, sum_v (B, H, n, c, D)."""
    count: torch.Tensor
    start: torch.Tensor
    stop: torch.Tensor
    sum_k: torch.Tensor
    sum_v: torch.Tensor


class PrefixSummaries:
    """Summaries from cumulative sums over positions: node sums restricted to positions <= t of each query.

    k, v: (B, H, N, D); positions: (n,) (on k's device); estimator: the mass estimator whose key features are
    summed too (stabilised with one offset per (batch, head), ``feat_offset`` (B, H, 1, 1): mass_estimators.py),
    or None."""

    def __init__(self, k, v, L: int, positions: torch.Tensor, estimator=None):
        pad = lambda x: torch.nn.functional.pad(x.cumsum(2), (0, 0, 1, 0))  # C[p] = sum of the first p rows
        feats, self.feat_offset = None, 0.0
        if estimator is not None and estimator.uses_features:
            with torch.no_grad():  # the features steer the descent only
                feats, self.feat_offset = estimator.log_scaled_features(k.detach(), "global")
        # keys alone (the descent's inner products) and keys with values side by side (one gather per bud in
        # ``__call__`` instead of one for the keys and one for the values)
        self.cumulative = {"k": pad(k), "kv": pad(torch.cat([k, v], -1)), "feat": None if feats is None else pad(feats)}
        self.L, self.positions, self.heads = L, positions, k.shape[1]

    def span(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """count, start, stop (B, n, c) of nodes (B, n, c), clipped to each query's prefix [0, t]."""
        start, stop = node_span(nodes, self.L)
        limit = (self.positions + 1).view(1, -1, 1)
        a, b = torch.minimum(start, limit), torch.minimum(stop, limit)
        return b - a, a, b

    def for_queries(self, positions: torch.Tensor) -> "PrefixSummaries":
        """The same sums read by the queries at ``positions`` (a block of them)."""
        view = copy.copy(self)
        view.positions = positions
        return view

    def range_sums(self, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        """Sums (B, H, n, c, F) of 'k', 'kv' (keys and values side by side) or 'feat' over the positions [a, b)
        (B, n, c)."""
        ia, ib = (x.unsqueeze(1).expand(-1, self.heads, -1, -1) for x in (a, b))
        c = self.cumulative[name]
        return gather_rows(c, ib) - gather_rows(c, ia)

    def sums(self, nodes: torch.Tensor, name: str) -> torch.Tensor:
        """Sums (B, H, n, c, F) over each node's visible positions of 'k', 'kv' or 'feat'."""
        _, a, b = self.span(nodes)
        return self.range_sums(a, b, name)

    def key_value_sums(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key sums (B, H, n, c, D) and value sums (B, H, n, c, Dv) over the positions [a, b), from one gather."""
        kv = self.range_sums(a, b, "kv")
        d = self.cumulative["k"].shape[-1]
        return kv[..., :d], kv[..., d:]

    def __call__(self, nodes: torch.Tensor) -> Summaries:
        count, a, b = self.span(nodes)
        return Summaries(count, a, b, *self.key_value_sums(a, b))


class HeapSummaries:
    """Arrays of node summaries over the heap; ``insert`` adds a token to the nodes on its leaf-to-root path."""

    def __init__(self, L: int, heads: int, head_dim: int, value_dim: int, feat_dim: int | None, dtype=torch.float64):
        n_nodes = 2 * L - 1
        self.L, self.length, self.feat_offset = L, 0, 0.0  # features kept without stabiliser (float64)
        self.count = torch.zeros(n_nodes, dtype=torch.long)
        self.arrays = {"k": torch.zeros(heads, n_nodes, head_dim, dtype=dtype),
                       "v": torch.zeros(heads, n_nodes, value_dim, dtype=dtype),
                       "feat": None if feat_dim is None else torch.zeros(heads, n_nodes, feat_dim, dtype=dtype)}

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
        for name, x in (("k", k), ("v", v), ("feat", feat)):
            if x is not None:
                self.arrays[name][:, nodes] += x.unsqueeze(1)
        self.length += 1

    def span(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # nodes (1, 1, c)
        start, stop = node_span(nodes, self.L)
        stop = torch.minimum(stop, torch.full_like(stop, self.length))
        return self.count[nodes], torch.minimum(start, stop), stop

    def sums(self, nodes: torch.Tensor, name: str) -> torch.Tensor:
        return self.arrays[name][:, nodes[0, 0]].unsqueeze(0).unsqueeze(2)  # (1, H, 1, c, F)

    def __call__(self, nodes: torch.Tensor) -> Summaries:
        return Summaries(*self.span(nodes), self.sums(nodes, "k"), self.sums(nodes, "v"))


def starting_buds(positions: torch.Tensor, L: int, P: int) -> torch.Tensor:
    """(n, P) node ids (-1 = none) of the first buds of each query: the nodes of the level whose nodes hold
    2^ceil(log2 l) / P positions, l = t + 1, that start at or before t (the report's start index)."""
    l = positions + 1
    cover = floor_log2((l - 1).clamp_min(1)) + (l > 1).long()  # ceil(log2 l): 2^cover >= l
    p_eff = torch.minimum(torch.full_like(cover, P), 1 << cover)  # a power of two
    level = int(math.log2(L)) - cover + floor_log2(p_eff)
    column = torch.arange(P, device=positions.device).view(1, -1)
    nodes = ((1 << level) - 1).view(-1, 1) + column
    start, _ = node_span(nodes, L)
    keep = (column < p_eff.view(-1, 1)) & (start <= positions.view(-1, 1))
    return torch.where(keep, nodes, torch.full_like(nodes, -1))


EXPANSION_RULES = ("needed", "P")


def round_bound(positions, n_terms, L: int, P: int) -> np.ndarray:
    """Per query, a bound on the rounds in which its descent expands buds, under either round rule (module
    docstring): floor((T - s0) / P) + E + d + 1 where T > s0, else 0. positions, n_terms: host arrays (numpy or
    CPU tensors) of the query positions t and their T; returns an int64 numpy array: host arithmetic, no torch op,
    so :class:`TreeAttention` sizes its descents from the positions (which the host knows) without a device read.

    d: the levels between the starting level and the leaves (its nodes hold 2^d positions); s0 = floor(t / 2^d) + 1
    starting buds; E: the nodes on the path to leaf t below the start whose right child is empty (t in their left
    half) and that hold more than one visible key, i.e. the zero bits of t among its d lowest above its lowest set
    bit. Proof: a round with at least m = min(need, P) eligible buds expands m of them and gains m minus its
    empty-right expansions; a round with fewer expands every eligible bud, so the shallowest eligible bud
    (at depth <= d - 1: it holds two keys) goes down a level: at most d such rounds. Rounds that expand P buds gain
    T - s0 at most in all, so there are at most floor((T - s0 + E1) / P) of them; a round of the 'needed' rule
    that expands need < P buds ends the descent unless one of its expansions had an empty right child (E2 of them);
    E1 + E2 <= E. So at most floor((T - s0) / P) + E + 1 + d rounds; the 'P' rule's are fewer (its rounds before
    the last gain at most T - 1 - s0)."""
    t = np.asarray(positions, dtype=np.int64).reshape(-1)
    log2 = lambda x: np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1  # floor(log2 x), exact: as floor_log2
    cover = log2(np.maximum(t, 1)) + (t > 0)  # ceil(log2 l), l = t + 1
    d = cover - log2(np.minimum(P, np.left_shift(1, cover)))  # levels below the start level
    s0 = np.right_shift(t, d) + 1
    k = np.arange(1, max(int(math.log2(L)), 1) + 1).reshape(1, -1)  # node sizes 2^k below the start
    node_t = t.reshape(-1, 1)
    empty_right = ((np.right_shift(node_t, k - 1) & 1) == 0) & ((node_t & (np.left_shift(1, k) - 1)) >= 1) & (
        k <= d.reshape(-1, 1))
    expand = np.maximum(np.asarray(n_terms, dtype=np.int64).reshape(-1) - s0, 0)
    return np.where(expand > 0, expand // P + empty_right.sum(-1) + d + 1, 0)


def resolve_early_exit(early_exit: bool | None, device) -> bool:
    """``early_exit=None`` (auto): on for CPU tensors (reading a flag from host memory costs no synchronisation),
    off on any other device (no host read: the descent runs its :func:`round_bound` rounds)."""
    return torch.device(device).type == "cpu" if early_exit is None else bool(early_exit)


def _generator_offset(generator: torch.Generator) -> int | None:
    """The position of a counter-based generator (CUDA's Philox), None for one without (the CPU's Mersenne Twister).

    A descent moves such a generator to its start plus 4 (rounds)(B n cap), at least what its rounds can draw
    (a CUDA draw of N numbers advances the offset by at most 4 N), so that the early exit, which draws fewer,
    leaves it where the full rounds do: later blocks and calls then draw the same numbers with it or without."""
    try:
        return generator.get_offset()
    except RuntimeError:
        return None


def raise_descent_flags(flags: torch.Tensor, method: str, rounds: int) -> None:
    """Raise for a descent's device flags (2,) bool: [a nan or +inf mass estimate, a query not done after the
    bound's rounds]. Reads them on the host (one read): call it only where a read is allowed."""
    invalid, unfinished = (bool(x) for x in flags.cpu())
    if invalid:
        raise NonFiniteError(f"tree: the {method!r} attention-mass estimate is nan or inf (overflow of "
                             f"its features at these scores); use method='alignment' or rescale q and k")
    if unfinished:
        raise RuntimeError(f"tree: the descent did not end within its bound of {rounds} rounds (a bug: please report)")


def descend(summaries, estimator, q: torch.Tensor, positions: torch.Tensor, n_terms: torch.Tensor, L: int, P: int,
            generator: torch.Generator, verbose: bool = False, expansions: str = "needed",
            early_exit: bool | None = None, cap: int | None = None, rounds: int | None = None,
            flags: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Buds (B, n, cap) (node ids, -1 = none) of each query after the descent, and the inner products (node
    evaluations q . sum) that it spent, (B, n) (module docstring).

    q: (B, H, n, D); positions: (n,) the query positions t; n_terms: (n,) T = ceil((t + 1)^e); all on one device,
    where the descent runs (``generator`` on that device too). The pm of a bud is read from its kept inner product
    (``estimator.score_source``: q . sum_k or phi(q) . sum phi(k)); an expansion evaluates the right child and
    gets the left one by subtraction. ``expansions``: 'needed' expands min(P, T - buds) buds per round (T buds
    exactly), 'P' expands P per round while there are fewer than T buds (the report's code: T to T + P - 1 buds).

    Host reads. ``cap`` (the bud columns beyond P: max T) and ``rounds`` (:func:`round_bound`'s maximum) are host
    integers: pass them (``TreeAttention`` computes them from the positions on the host) or they are read from
    ``n_terms`` / ``positions`` (a host read each). The loop runs ``rounds`` rounds; ``early_exit`` stops as soon as
    no query needs another round, which asks the device whether any does: a host read of one boolean per round,
    3-4x fewer rounds (None: on for CPU tensors, off elsewhere, :func:`resolve_early_exit`). The rounds it skips
    change no bud; they only draw random numbers, so on and off give the same buds. A CUDA generator is then moved
    to a position that does not depend on the rounds run (:func:`_generator_offset`), so the next descent draws the
    same numbers either way; the CPU's generator cannot jump and ends further on without the early exit. A NaN or +inf mass estimate, or a query not done after ``rounds`` rounds (a bug), sets a device
    flag: with ``flags`` ((2,) bool on the device) they are or-ed into it and nothing is read (the caller raises
    later, :func:`raise_descent_flags`); without, they raise here (``common.validation.NonFiniteError`` naming the
    method; RuntimeError), one host read.
    """
    if expansions not in EXPANSION_RULES:
        raise ValueError(f"tree: expansions must be one of {EXPANSION_RULES}, got {expansions!r}")
    b, h, n, _ = q.shape
    device = q.device
    early_exit = resolve_early_exit(early_exit, device)
    cap = (int(n_terms.max()) if cap is None else cap) + P
    if rounds is None:
        rounds = int(round_bound(positions.cpu(), n_terms.cpu(), L, P).max())
    start_offset = _generator_offset(generator)
    source = estimator.score_source
    query, log_offset = None, 0.0
    if source == "k":
        query = q
    elif source == "feat":
        query, query_offset = estimator.log_scaled_features(q, "row")
        log_offset = query_offset + summaries.feat_offset

    def evaluate(nodes):  # (B, H, n, c) inner products of the query with the nodes' sums (0 where no node)
        sums = summaries.sums(nodes.clamp_min(0), source)
        return torch.einsum("bhnf,bhncf->bhnc", query, sums) * (nodes >= 0).unsqueeze(1)

    buds = torch.full((b, n, cap + 1), -1, dtype=torch.long, device=device)  # the last column: a sink for writes
    buds[:, :, :P] = starting_buds(positions, L, P)
    scores = None if query is None else torch.zeros((b, h, n, cap + 1), dtype=query.dtype, device=device)
    if scores is not None:
        scores[..., :P] = evaluate(buds[:, :, :P])
    used = torch.full((b, n), P, dtype=torch.long, device=device)
    inner_products = (buds[:, :, :P] >= 0).sum(-1)
    target = n_terms.view(1, n).expand(b, n).clamp_max(cap - P)  # (a host cap below a device T: never exceeded)
    invalid = torch.zeros((), dtype=torch.bool, device=device)
    heads_index = lambda idx: idx.unsqueeze(1).expand(-1, h, -1, -1)
    column = torch.arange(P, device=device)
    if verbose:
        print(f"query at position {int(positions[0])} (l = {int(positions[0]) + 1} keys), T = {int(n_terms[0])}; "
              f"starting buds: {buds[0, 0, :P][buds[0, 0, :P] >= 0].tolist()}")
    for round_ in range(rounds + 1):
        width = min(cap, P * (round_ + 1))  # a round adds at most P buds: the later columns are still empty
        nodes = buds[:, :, :width].clone()
        live = nodes >= 0
        count, start, stop = summaries.span(nodes.clamp_min(0))
        count = count * live
        eligible = live & (count > 1)  # pm 0 for a bud with one visible key: nothing to descend to
        need = (target - live.sum(-1)).clamp_min(0)
        active = (need > 0) & eligible.any(-1)
        if round_ == rounds or (early_exit and not active.any()):
            break
        log_pm = estimator.log_mass(None if scores is None else scores[..., :width], count, start, stop, positions,
                                    log_offset)
        invalid |= (eligible & active.unsqueeze(-1) & (torch.isnan(log_pm) | (log_pm == float("inf")))).any()
        positive = eligible & (log_pm > float("-inf")) & (log_pm < float("inf"))
        u = torch.rand(log_pm.shape, generator=generator, dtype=torch.float64, device=device).clamp_min(1e-300)
        gumbel = -torch.log(-torch.log(u))
        # Gumbel-top-P among the buds with pm > 0 (P draws without replacement, prop. to pm), then, where fewer
        # are needed than they hold, uniformly among those with pm 0 (the original's + 1e-10 on every pm)
        first_keys, first = torch.where(positive, log_pm.double() + gumbel, float("-inf")).topk(P, dim=-1)
        second_keys, second = torch.where(eligible & ~positive, gumbel, float("-inf")).topk(P, dim=-1)
        n_first = torch.isfinite(first_keys).sum(-1, keepdim=True)  # the valid draws lead each top-P
        n_second = torch.isfinite(second_keys).sum(-1, keepdim=True)
        m = (need.clamp_max(P) if expansions == "needed" else torch.full_like(need, P)) * active
        chosen = column < torch.minimum(m.unsqueeze(-1), n_first + n_second)  # P columns: first draws, then second
        from_second = torch.gather(second, -1, (column - n_first).clamp(0, P - 1))
        slots = torch.where(chosen, torch.where(column < n_first, first, from_second), cap)  # others: the sink
        parent = torch.gather(buds, -1, slots)
        left, right = 2 * parent + 1, 2 * parent + 2
        right_start, _ = node_span(right, L)
        right = right.masked_fill(~chosen | (right_start > positions.view(1, n, 1)), -1)  # beyond t: empty
        two_children = right >= 0
        rank = two_children.long().cumsum(-1) - 1
        target_slot = torch.where(two_children, used.unsqueeze(-1) + rank, cap)
        if scores is not None:  # right child: one inner product; left child: the parent's minus the right's
            right_scores = evaluate(right)
            parent_scores = torch.gather(scores, -1, heads_index(slots))
            scores.scatter_(-1, heads_index(slots), parent_scores - right_scores)
            scores.scatter_(-1, heads_index(target_slot), right_scores)
        buds.scatter_(-1, slots, torch.where(chosen, left, -1))
        buds.scatter_(-1, target_slot, right)
        buds[:, :, cap] = -1
        used += two_children.sum(-1)
        inner_products += two_children.sum(-1)
        if verbose:
            _print_round(nodes[0, 0], summaries, log_pm[0, 0], parent[0, 0][chosen[0, 0]],
                         right[0, 0][chosen[0, 0]], buds[0, 0, :cap], q)
    if start_offset is not None:  # the generator where the bound's rounds leave it at most, early exit or not
        generator.set_offset(start_offset + 4 * rounds * b * n * cap)
    found = torch.stack([invalid, active.any()])
    if flags is None:
        raise_descent_flags(found, estimator.method, rounds)
    else:
        flags |= found
    return buds[:, :, :cap], inner_products


def _print_round(nodes, summaries, log_pm, expanded_nodes, right_children, new_buds, q):
    """One round as the report's verbose run shows it (first batch element and query)."""
    live = nodes >= 0
    sum_k = summaries.sums(nodes.clamp_min(0).view(1, 1, -1), "k")[0, :, 0]  # (H, c, D)
    align = torch.einsum("hd,hcd->hc", q[0, :, 0], sum_k)  # q . sum of the bud's keys
    finite = torch.isfinite(log_pm)  # every pm 0 (all -inf): zeros, without asking the device which case it is
    pm = torch.where(finite, torch.exp(log_pm - torch.where(finite, log_pm, float("-inf")).max()), 0.0)
    pm = pm / pm.sum().clamp_min(1e-300)
    print("start sampling")
    print(f"  buds: {nodes[live].tolist()}")
    print(f"  alignments (q . sum of keys, head 0): {[round(x, 3) for x in align[0][live].tolist()]}")
    print(f"  normalised pm: {[round(x, 4) for x in pm[live].tolist()]}")
    for node, right in zip(expanded_nodes.tolist(), right_children.tolist()):
        children = f"{2 * node + 1} and {right}" if right >= 0 else f"{2 * node + 1} (right child empty)"
        print(f"  sampled bud {node}: expanding {node} into {children}")
    print(f"  new buds: {new_buds[new_buds >= 0].tolist()}")


def combine(q: torch.Tensor, s: Summaries, valid: torch.Tensor, scale: float, bud_value: str,
            return_lse: bool = False):
    """The output per head from the buds' summaries.

    ``report``: softmax over buds of S q . mean key, times the buds' value sums (the original's combination);
    ``count``: each bud weighted by count * exp(S q . mean key), times its mean value; with every bud a leaf this
    is exact softmax attention. ``return_lse`` (``count`` only): also the log of that normaliser,
    logsumexp over the buds of S q . mean key + log count (B, H, n), -inf where no bud is valid.
    """
    count = s.count.clamp_min(1).unsqueeze(1).to(q.dtype)  # (B, 1, n, c)
    score = scale * torch.einsum("bhnd,bhncd->bhnc", q, s.sum_k) / count
    valid = valid.unsqueeze(1)
    if bud_value == "report":
        weights = torch.softmax(score.masked_fill(~valid, float("-inf")), -1)
        return torch.einsum("bhnc,bhncv->bhnv", weights, s.sum_v)
    logits = (score + torch.log(count)).masked_fill(~valid, float("-inf"))
    out = torch.einsum("bhnc,bhncv->bhnv", torch.softmax(logits, -1), s.sum_v / count.unsqueeze(-1))
    return (out, torch.logsumexp(logits, -1)) if return_lse else out
