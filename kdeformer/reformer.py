"""Reformer's LSH attention (Kitaev, Kaiser, Levskaya, ICLR 2020, Sec. 2), registered as ``reformer``.

Angular LSH by random rotations (their eq. 3): with R a (d x b/2) Gaussian matrix and x normalised,
h(x) = argmax([xR ; -xR]) picks one of b buckets, so vectors at a small angle share a bucket. Queries and keys are
hashed with the same R (Reformer ties them, Q = K; here they may differ, and with q = k it is the shared-QK
scheme), sorted by (bucket, position), and cut into chunks: ``bucket_size`` keys per chunk, the sorted queries into
as many chunks. Each query chunk attends exactly to its key chunk and the one before (look-one-back, cyclic).
With ``n_hashes`` rounds the per-round sums are merged, i.e. out = sum_r (D_r / sum D) o_r, the combination of
their eq. 5 (pairs found in several rounds are counted in each; the paper's duplicate correction is not applied).

Causal: keys after the query's position (``common.causal_query_positions``) are masked inside the chunks, and every
query also reads its own position's key exactly in every round (masked out of the chunks), so no row is empty.

Numerics: logits, max-subtracted exponentials and sums (:func:`common.partial_sums.from_logits`) are computed in
float32 for bfloat16 / float16 inputs (the output is cast back: output dtype = input dtype) and in the input dtype
otherwise.
"""
from __future__ import annotations

import math
import warnings

import torch

from common.attention import AttentionMethod, causal_query_positions, gather_rows, output_and_lse
from common.partial_sums import PartialSums, from_logits
from common.registry import register
from common.validation import check_int

BLOCK_BYTES = 2 ** 31  # the logits and weights of one group of chunks (:func:`lsh_round`)


def rotation_buckets(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Bucket ids h(x) = argmax([x R ; -x R]) of the normalised x; (..., N) long in [0, 2 * R.shape[1])."""
    rotated = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ rotation.to(x.dtype)
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def lsh_round(q, k, v, scale: float, bucket_size: int, n_buckets: int, causal: bool,
              generator: torch.Generator) -> PartialSums:
    """One hashing round: sums over each query's chunk and the previous chunk of keys."""
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    rotation = torch.randn(d, max(1, n_buckets // 2), generator=generator, dtype=q.dtype, device=q.device)
    n_chunks = math.ceil(nk / bucket_size)
    q_chunk = math.ceil(nq / n_chunks)
    pos_k = torch.arange(nk, device=q.device)
    pos_q = causal_query_positions(nq, nk, q.device)
    # sort by bucket, ties by position: key = bucket * N + position
    perm_k = torch.sort(rotation_buckets(k, rotation) * nk + pos_k, dim=-1).indices
    perm_q = torch.sort(rotation_buckets(q, rotation) * nk + pos_q, dim=-1).indices
    pad_k, pad_q = n_chunks * bucket_size - nk, n_chunks * q_chunk - nq
    perm_k = torch.nn.functional.pad(perm_k, (0, pad_k), value=-1)
    perm_q_pad = torch.nn.functional.pad(perm_q, (0, pad_q))
    key_valid = (perm_k >= 0).view(b, h, n_chunks, bucket_size)
    perm_k = perm_k.clamp_min(0)
    kc = gather_rows(k, perm_k).view(b, h, n_chunks, bucket_size, d)
    vc = gather_rows(v, perm_k).view(b, h, n_chunks, bucket_size, dv)
    pk = perm_k.view(b, h, n_chunks, bucket_size)
    if n_chunks > 1:  # look one chunk back (cyclically)
        back = lambda t: torch.cat([t, t.roll(1, dims=2)], dim=3)
        kc, vc, pk, key_valid = back(kc), back(vc), back(pk), back(key_valid)
    qc = gather_rows(q, perm_q_pad).view(b, h, n_chunks, q_chunk, d)
    qpos = pos_q[perm_q_pad].view(b, h, n_chunks, q_chunk, 1)
    # chunks in groups: a group's logits and weights take about BLOCK_BYTES whatever the bucket size
    step = max(1, BLOCK_BYTES // (b * h * q_chunk * kc.shape[3] * (3 * q.element_size() + 2)))
    pieces = []
    for c0 in range(0, n_chunks, step):
        part = slice(c0, c0 + step)
        logits = torch.einsum("bhcqd,bhckd->bhcqk", qc[:, :, part], kc[:, :, part]) * scale
        allowed = key_valid[:, :, part].unsqueeze(3).expand_as(logits)
        if causal:
            allowed = allowed & (pk[:, :, part].unsqueeze(3) < qpos[:, :, part])  # strictly past; own key below
        pieces.append(from_logits(logits.masked_fill(~allowed, float("-inf")), vc[:, :, part], "bhcqk,bhckv->bhcqv"))
    parts = PartialSums(*(torch.cat([getattr(p, f) for p in pieces], dim=2) for f in ("num", "den", "shift")))
    inverse = torch.empty_like(perm_q).scatter_(-1, perm_q, torch.arange(nq, device=q.device).expand(b, h, nq))
    parts = parts.map_queries(lambda t: gather_rows(t.reshape(b, h, n_chunks * q_chunk, t.shape[-1]), inverse))
    if causal:  # the own position's key, exactly (it was masked out of the chunks so no row is empty)
        k_own, v_own = k[:, :, pos_q], v[:, :, pos_q]
        parts = parts.merge(from_logits(((q * k_own).sum(-1) * scale).unsqueeze(-1), v_own.unsqueeze(3),
                                        "bhqs,bhqsv->bhqv"))
    return parts


@register("reformer")
class ReformerAttention(AttentionMethod):
    """LSH attention (module docstring). Options: bucket_size (64), n_hashes (hashing rounds, 1), n_buckets
    (default: 2 * ceil(Nk / bucket_size / 2), the paper's n / bucket_size rounded to even), seed. The chunks are
    attended in groups of about :data:`BLOCK_BYTES` of logits, so memory grows like Nk (D + Dv) whatever the bucket.

    A bucket_size larger than the keys of a call (e.g. a short prompt while decoding) is clamped to Nk (one chunk:
    exact) and said once per instance (``warnings.warn``)."""

    randomized = True
    supports_lse = True

    def __init__(self, bucket_size: int = 64, n_hashes: int = 1, n_buckets: int | None = None,
                 seed: int | None = None, check_finite: bool = True):
        super().__init__(seed=seed, check_finite=check_finite)
        self.bucket_size = check_int(bucket_size, "bucket_size", "reformer", minimum=1)
        self.n_hashes = check_int(n_hashes, "n_hashes", "reformer", minimum=1)
        self.n_buckets = None if n_buckets is None else check_int(n_buckets, "n_buckets", "reformer", minimum=1)
        self._warned_clamp = False

    @classmethod
    def exact_options(cls, n_keys):
        """One chunk holding every key: each query reads all keys (causal: all earlier ones), in every round."""
        return {"bucket_size": n_keys, "n_hashes": 1}

    def _sums(self, q, k, v, causal, scale) -> PartialSums:
        """The rounds' sums merged, in float32 at least."""
        nk = k.shape[2]
        bucket_size = min(self.bucket_size, nk)
        if bucket_size < self.bucket_size and not self._warned_clamp:
            self._warned_clamp = True
            warnings.warn(f"reformer: bucket_size={self.bucket_size} is larger than the number of keys Nk={nk}; "
                          "clamped to Nk (one chunk of all keys: exact). Said once per instance.", stacklevel=4)
        n_buckets = self.n_buckets or 2 * math.ceil(nk / bucket_size / 2)
        gen = self.generator(q.device)
        work = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype
        parts = None
        for _ in range(self.n_hashes):
            r = lsh_round(q.to(work), k.to(work), v.to(work), scale, bucket_size, n_buckets, causal, gen)
            parts = r if parts is None else parts.merge(r)
        return parts

    def attend(self, q, k, v, causal, scale):
        return self._sums(q, k, v, causal, scale).output().to(q.dtype)

    def attend_lse(self, q, k, v, causal, scale):
        """(out, log of the rounds' merged normaliser) for ``return_lse=True``."""
        return output_and_lse(self._sums(q, k, v, causal, scale), q.dtype)

    @classmethod
    def budgets(cls, n_keys):
        root = max(8, 2 ** round(math.log2(math.sqrt(n_keys))))
        return [{"bucket_size": min(n_keys, f // 2)} for f in (root, 2 * root, 4 * root)]
