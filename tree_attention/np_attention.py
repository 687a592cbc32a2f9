"""Tree attention ("High Attention Scores and Where to Find Them", ETH Zurich deep learning project report, 2024).

Two fronts over one descent (``tree.py``) and one set of mass estimators (``mass_estimators.py``):

- :class:`attention_kernel` (the report's class and argument names): incremental decoding, one position at a
  time, ``forward(T, k, q, v)`` inserts the token's key/value into the heap of node summaries and attends the
  query through a descent to T buds; ``verbose=True`` prints the descent as the report shows it.
- :class:`TreeAttention`, registered as ``tree``: a whole causal sequence at once (summaries from prefix sums,
  vectorised over batch and queries, heads sharing the descent), with T = ceil(l^e) for the query at position
  l - 1 (e = ``number_of_terms_exponent``); the inner products q . sum_k that the report's incremental algorithm
  spends per query (``tree.py``) are kept in ``last_inner_products`` (B, n).

``tree-less`` (the baseline without a tree; our reading of it): the T - 1 most recent keys as single-key buds plus
one bud summarising all older keys, combined like the tree's buds.

The report's L = 8 example (:func:`report_example`) runs as ``python -m tree_attention.demo``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.attention import AttentionMethod, causal_query_positions
from common.registry import register
from common.validation import check_choice, check_int

from .mass_estimators import METHODS, MassEstimator
from .tree import (EXPANSION_RULES, HeapSummaries, PrefixSummaries, Summaries, combine, descend, raise_descent_flags,
                   round_bound)

BUD_VALUES = ("count", "report")
BLOCK_BYTES = 2 ** 34  # the buds' summaries of one block of queries (``TreeAttention``, option query_block)


def _check_tree_options(method: str, P: int, L: int | None, e: float | None = None) -> None:
    check_choice(method, "method", "tree", METHODS)
    check_int(P, "parallelism", "tree", minimum=1)
    if P & (P - 1):
        raise ValueError(f"tree: parallelism P must be a power of two, got {P}")
    if L is not None and (L < 1 or L & (L - 1)):
        raise ValueError(f"tree: L must be a power of two (pad the sequence to one), got {L}")
    if L is not None and P > L:
        raise ValueError(f"tree: parallelism P={P} exceeds the number of leaves L={L}")
    if e is not None and not 0 < e <= 1:
        raise ValueError(f"tree: number_of_terms_exponent must be in (0, 1], got {e}")


def number_of_terms(l, e: float):
    """T = ceil(l^e) buds for a query with l visible keys (a tiny slack keeps l^1 = l exact in floating point), of a
    tensor l on its device or of a numpy array (the host's copy of the positions, :class:`TreeAttention`)."""
    if isinstance(l, np.ndarray):
        return np.maximum(np.ceil(l.astype(np.float64) ** e - 1e-9), 1).astype(np.int64)
    return torch.ceil(l.double() ** e - 1e-9).long().clamp_min(1)


class attention_kernel(torch.nn.Module):  # noqa: N801  (the report's name)
    """Incremental tree attention for one sequence: D head dim, S score scale, P parallelism, L leaves, H heads."""

    def __init__(self, D: int, S: float, P: int, L: int, H: int, method: str, R: int = 64, base: float = 0.9,
                 verbose: bool = False, seed: int = 0, expansions: str = "needed"):
        super().__init__()
        _check_tree_options(method, P, L)
        self.expansions = check_choice(expansions, "expansions", "tree", EXPANSION_RULES)
        if method == "tree-less":
            raise ValueError("attention_kernel: 'tree-less' has no tree; use TreeAttention (get_attention('tree'))")
        self.D, self.S, self.P, self.L, self.H, self.verbose = D, S, P, L, H, verbose
        self.generator = torch.Generator().manual_seed(seed)
        self.estimator = MassEstimator(method, D, S, R, base, self.generator)
        self.heap = HeapSummaries(L, H, D, D, None, torch.float64)
        self.last_buds = None

    def forward(self, T: int, k: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Insert (k, v) of the next position, then attend q to the prefix with T buds; k, q, v: (H, D)."""
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= self.heap.length + 1:
            raise ValueError(f"attention_kernel: T must be an int in [1, l] (l = {self.heap.length + 1} keys after "
                             f"this insertion), got {T!r}")
        k, q, v = (torch.as_tensor(x, dtype=torch.float64) for x in (k, q, v))
        feat = self.estimator.features(k) if self.estimator.uses_features else None
        if self.heap.arrays["feat"] is None and feat is not None:
            self.heap.arrays["feat"] = torch.zeros(self.H, 2 * self.L - 1, feat.shape[-1], dtype=torch.float64)
        self.heap.insert(k, v, feat)
        position = torch.tensor([self.heap.length - 1])
        qb = q.view(1, self.H, 1, self.D)
        buds, _ = descend(self.heap, self.estimator, qb, position, torch.tensor([T]), self.L, self.P,
                          self.generator, self.verbose, self.expansions)
        self.last_buds = buds[0, 0][buds[0, 0] >= 0].tolist()
        s = self.heap(buds.clamp_min(0))
        return combine(qb, s, (buds >= 0) & (s.count > 0), self.S, "report")[0, :, 0]


@register("tree")
class TreeAttention(AttentionMethod):
    """Tree attention over a whole causal sequence (module docstring). Options: method, number_of_terms_exponent
    e in (0, 1], parallelism P (power of two), R (random features), base (time-decay), bud_value ('count' or
    'report'), expansions ('needed': T buds exactly, or 'P': the report's P expansions per round, ``tree.py``),
    query_block (queries per descent: bounds the memory, O(B H query_block (T + P) D); default None: as many as
    keep a block's buds' sums near :data:`BLOCK_BYTES`, so that memory grows like Nq (D + Dv) whatever T),
    early_exit (``tree.descend``: None, the default, stops a descent once no query needs a round on CPU tensors
    and runs the bound's rounds elsewhere; True: stop early on every device, one host read per round, a sync on
    CUDA; False: never), seed. Non-causal calls treat every query as sitting after all keys.

    Runs on the inputs' device, the descent included, and reads nothing back to the host on a GPU unless asked:
    the bud capacity and the rounds of each block (``tree.round_bound``) come from the query positions, which the
    host knows; the descent's failure flags (a nan or inf mass, a descent that did not end) stay on the device and
    are read once per call, after the last block, only under ``check_finite=True`` (the base class reads the
    inputs and output then anyway). With ``check_finite=False`` and the default ``early_exit`` a CUDA call never
    synchronises (tests/tree_attention/test_no_host_sync.py); a nan mass is then not raised: those buds are drawn
    like buds of mass 0, and the output stays finite.

    Precision: float16 / bfloat16 inputs are computed in float32 (features, masses, sums, the softmax over buds,
    max-subtracted by ``torch.softmax``) and the output is cast back to the input dtype; float32 and float64 stay
    as they are (a caller's autocast is off inside, as for every method: the output keeps the input dtype). A nan or inf mass
    estimate raises ``NonFiniteError`` naming the method (mass_estimators.py keeps the features' exponentials
    stabilised, so it does not arise for scores up to 1e4)."""

    randomized = True
    supports_lse = True

    def __init__(self, method: str = "alignment", number_of_terms_exponent: float = 0.5, parallelism: int = 4,
                 R: int = 64, base: float = 0.9, bud_value: str = "count", expansions: str = "needed",
                 query_block: int | None = None, early_exit: bool | None = None, seed: int | None = None,
                 check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        _check_tree_options(method, parallelism, None, number_of_terms_exponent)
        self.method, self.number_of_terms_exponent, self.parallelism = method, number_of_terms_exponent, parallelism
        self.R, self.base = R, base
        self.bud_value = check_choice(bud_value, "bud_value", "tree", BUD_VALUES)
        self.expansions = check_choice(expansions, "expansions", "tree", EXPANSION_RULES)
        self.query_block = None if query_block is None else check_int(query_block, "query_block", "tree", minimum=1)
        if early_exit is not None and not isinstance(early_exit, bool):
            raise ValueError(f"tree: early_exit must be None, True or False, got {early_exit!r}")
        self.early_exit = early_exit
        self.last_inner_products = None
        MassEstimator(method, 1, 1.0, R, base)  # validates R / base now, not at the first call

    @classmethod
    def exact_options(cls, n_keys):
        """e = 1 with the count-weighted combination: every visible key ends as its own bud (exact, any method)."""
        return {"number_of_terms_exponent": 1.0, "bud_value": "count"}

    def attend(self, q, k, v, causal, scale):
        # (a caller's autocast is off here, the base class's forward: under bfloat16 autocast the descent's inner
        # products came back in bfloat16 and a scatter of mixed dtypes failed, issue 14's evaluation)
        return self._attend_tree(q, k, v, causal, scale, False)

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the count-weighted normaliser over the buds, :func:`combine`) for ``return_lse=True``."""
        if self.bud_value != "count":
            raise ValueError(f"tree: return_lse=True needs bud_value='count' (bud_value={self.bud_value!r} weighs "
                             "the buds without their key counts: no normaliser of the keys)")
        return self._attend_tree(q, k, v, causal, scale, True)

    def _attend_tree(self, q, k, v, causal, scale, return_lse):
        work = torch.promote_types(q.dtype, torch.float32)
        if q.dtype != work:  # float16 / bfloat16: computed in float32, returned in the input dtype
            result = self._attend_tree(q.to(work), k.to(work), v.to(work), causal, scale, return_lse)
            return (result[0].to(q.dtype), result[1]) if return_lse else result.to(q.dtype)
        nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
        positions = causal_query_positions(nq, nk, q.device) if causal else torch.full((nq,), nk - 1, device=q.device)
        # the same positions on the host (numpy: no torch op), for the sizes and round counts: no device read
        host_positions = np.arange(nq) + (nk - nq) if causal else np.full(nq, nk - 1)
        host_terms = number_of_terms(host_positions + 1, self.number_of_terms_exponent)
        n_terms = number_of_terms(positions + 1, self.number_of_terms_exponent)
        if self.method == "tree-less":
            return self._tree_less(q, k, v, positions, n_terms, int(host_terms.max()), scale, return_lse)
        L = 1 << max(0, math.ceil(math.log2(nk)))
        P = min(self.parallelism, L)
        generator = self.generator(q.device)
        estimator = MassEstimator(self.method, d, scale, self.R, self.base, generator)
        summaries_all = PrefixSummaries(k, v, L, positions, estimator)
        outputs, inner_products = [], []
        flags = torch.zeros(2, dtype=torch.bool, device=q.device)  # a nan / inf mass, a descent that did not end
        bounds = round_bound(host_positions, host_terms, L, P)
        # the buds' key and value sums (and their differences, quotients) of a block: a few (T + P)(D + Dv) per query
        rows = self.query_block or max(1, BLOCK_BYTES // (q.shape[0] * q.shape[1] * (int(host_terms.max()) + P) * (
            d + v.shape[-1]) * q.element_size() * 4))
        for i in range(0, nq, rows):  # independent queries: one descent per block
            block = slice(i, i + rows)
            summaries = summaries_all.for_queries(positions[block])
            rounds = int(bounds[block].max())
            with torch.no_grad():  # the descent is discrete; gradients flow through the buds' summaries below
                buds, inner = descend(summaries, estimator, q[:, :, block].detach(), positions[block],
                                      n_terms[block], L, P, generator, expansions=self.expansions,
                                      early_exit=self.early_exit, cap=int(host_terms[block].max()), rounds=rounds,
                                      flags=flags)
            s = summaries(buds.clamp_min(0))
            outputs.append(combine(q[:, :, block], s, (buds >= 0) & (s.count > 0), scale, self.bud_value,
                                   return_lse))
            inner_products.append(inner)
        self.last_inner_products = torch.cat(inner_products, 1)
        if self.check_finite:  # one read per call, where the caller allows reads
            raise_descent_flags(flags, self.method, int(bounds.max()))
        if return_lse:
            return torch.cat([o for o, _ in outputs], 2), torch.cat([lse for _, lse in outputs], 2)
        return torch.cat(outputs, 2)

    def _tree_less(self, q, k, v, positions, n_terms, window, scale, return_lse=False):
        """Buds: the T - 1 most recent keys, and one bud with all older keys (``window``: max T, from the host)."""
        offsets = torch.arange(window, device=q.device)  # bud j < T - 1: the key at t - j; bud T - 1: [0, t - T + 2)
        recent = positions.view(-1, 1) - offsets
        valid_recent = (offsets < (n_terms - 1).view(-1, 1)) & (recent >= 0)
        older_stop = (positions + 1 - (n_terms - 1)).clamp_min(0)
        start = torch.where(valid_recent, recent, torch.zeros_like(recent))
        stop = torch.where(valid_recent, recent + 1, torch.zeros_like(recent))
        start = torch.cat([start, torch.zeros_like(start[:, :1])], 1).unsqueeze(0)
        stop = torch.cat([stop, older_stop.view(-1, 1)], 1).unsqueeze(0)
        b = q.shape[0]
        start, stop = start.expand(b, -1, -1), stop.expand(b, -1, -1)
        summaries = PrefixSummaries(k, v, 1, positions)
        s = Summaries(stop - start, start, stop, *summaries.key_value_sums(start, stop))
        self.last_inner_products = (s.count > 0).sum(-1)  # one q . sum_k per non-empty bud
        return combine(q, s, s.count > 0, scale, self.bud_value, return_lse)

    @classmethod
    def budgets(cls, n_keys):
        # P = 16 keeps the number of descent rounds (about log2 L + T / P) small enough for the comparison grid;
        # P is capped below the last query's T = ceil(n^e) (a power of two, at least 1): starting from P >= T buds
        # no descent step runs and the output depends on neither the budget nor the seed (small n)
        def parallelism(e):
            n_terms = int(number_of_terms(torch.tensor([max(int(n_keys), 1)]), e))
            return min(16, 1 << max(0, (n_terms - 1).bit_length() - 1))
        return [{"number_of_terms_exponent": e, "parallelism": parallelism(e)} for e in (0.3, 0.45, 0.6)]


def report_example(method: str = "alignment", verbose: bool = True, seed: int = 0, last_terms: int = 8):
    """The report's test: L = 8, D = 64, H = 1, P = 1, e = 1.0, random q/k/v, the last query equal to key 3.

    Returns the buds of the last query's descent. With e = 1 (``last_terms`` = 8) they end as all 8 leaves; the
    point of the example is the order: ``alignment`` goes straight down the path 0 -> 1 -> 4 -> leaf 10 of key 3
    first, so with ``last_terms`` = 4 (three expansions) the buds already hold leaf 10.
    """
    L, D = 8, 64
    g = torch.Generator().manual_seed(seed)
    keys, queries, values = (torch.randn(L, 1, D, generator=g, dtype=torch.float64) for _ in range(3))
    queries[-1] = keys[3]
    kernel = attention_kernel(D, 1 / math.sqrt(D), 1, L, 1, method, seed=seed)
    for t in range(L):
        kernel.verbose = verbose and t == L - 1
        kernel(last_terms if t == L - 1 else math.ceil((t + 1) ** 1.0), keys[t], queries[t], values[t])
    return kernel.last_buds
