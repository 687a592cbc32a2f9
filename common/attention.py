"""Exact softmax attention, the reference every method is compared against, and the base class of methods.

Softmax attention (Vaswani et al. 2017, eq. 1):

    A = softmax(S * Q K^T + M),   out = A V,

with S the scale (1/sqrt(D) by default) and M the mask (0 where allowed, -inf where not). With
``causal=True`` query i reads key j iff j <= i + (Nk - Nq) (see :mod:`common.validation`).

Two entries compute it:
- :func:`softmax_attention`: the explicit formula in plain PyTorch (scores, mask, softmax, product); any
  float dtype, float64 included. It is the reference of the tests.
- the registered method ``exact``: ``torch.nn.functional.scaled_dot_product_attention``, the fast path used
  as the baseline of benchmarks. The two agree to 1e-6 in float64 (tests/common/test_attention.py).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register
from .validation import check_finite_result, check_qkv, resolve_scale


def causal_query_positions(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """p_i = i + (Nk - Nq): the position of query i in the key sequence (the queries are the last Nq positions,
    "bottom-right" alignment); under ``causal=True`` query i reads exactly the keys j <= p_i."""
    return torch.arange(n_queries, device=device) + (n_keys - n_queries)


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where query i may read key j, i.e. j <= p_i = i + (Nk - Nq)."""
    j = torch.arange(n_keys, device=device).unsqueeze(0)
    return j <= causal_query_positions(n_queries, n_keys, device).unsqueeze(1)


def allowed_key_counts(n_queries: int, n_keys: int, causal: bool, device=None) -> torch.Tensor:
    """|P_i|, the number of keys query i may read: Nk, or i + 1 + (Nk - Nq) under the causal convention."""
    if not causal:
        return torch.full((n_queries,), n_keys, device=device, dtype=torch.long)
    return causal_query_positions(n_queries, n_keys, device) + 1


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, H, N, D) picked by a long index (B, H, *S) -> (B, H, *S, D), e.g. sampled keys per query.

    Implemented as one ``index_select`` on the flattened (B*H*N, D) rows, which is several times faster on CPU
    than ``torch.gather`` with an index expanded over D.
    """
    b, h, n, d = x.shape
    if index.shape[:2] != (b, h):
        raise ValueError(f"gather_rows: index must start with the (B, H) = {(b, h)} of x, got {tuple(index.shape)}")
    offsets = (torch.arange(b * h, device=x.device) * n).view(b, h, *([1] * (index.dim() - 2)))
    return x.reshape(b * h * n, d).index_select(0, (index + offsets).reshape(-1)).view(*index.shape, d)


def attention_scores(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                     scale: float | None = None) -> torch.Tensor:
    """Scaled, masked scores S * Q K^T + M of shape (B, H, Nq, Nk); masked entries are -inf."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * resolve_scale(scale, q.shape[-1])
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return scores


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """The attention matrix A = softmax(S * Q K^T + M) of shape (B, H, Nq, Nk); rows sum to one."""
    check_qkv(q, k, k[..., :1], causal=causal, scale=scale, method="attention_weights")
    return torch.softmax(attention_scores(q, k, causal, scale), dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """Reference attention softmax(S Q K^T + M) V computed with explicit scores (O(Nq Nk) memory)."""
    check_qkv(q, k, v, causal=causal, scale=scale, method="softmax_attention")
    return torch.matmul(torch.softmax(attention_scores(q, k, causal, scale), dim=-1), v)


class AttentionMethod(nn.Module):
    """Base of every registered method: ``out = method(q, k, v, causal=False, scale=None)``.

    Subclasses implement :meth:`attend` and may set the class attributes below. ``forward`` validates the
    inputs once (shared messages, docs/DESIGN.md) and refuses what the method cannot honour; it answers an empty batch
    (B = 0 or H = 0) itself with an empty (B, H, Nq, Dv) tensor, as SDPA does, without calling ``attend``; and,
    when ``check_finite`` is on (the inputs were checked finite), it raises
    :class:`~common.validation.NonFiniteError` naming the method if ``attend`` returned a nan or inf.

    Class attributes:
        supports_causal: False -> ``causal=True`` raises a ValueError naming the method.
        trainable: False -> the method is inference-only and raises if its inputs require grad.
        randomized: True -> the method draws random numbers from ``self.generator`` (seeded by ``seed``).
        exact_tolerance: relative Frobenius error vs exact attention that :meth:`exact_options` guarantees on
            float64 inputs (1e-6: exact up to rounding; a method whose exact options only approach exact raises it
            and says why in its docstring).
    """

    name = "attention"
    supports_causal = True
    trainable = True
    randomized = False
    exact_tolerance = 1e-6

    def __init__(self, seed: int | None = None, check_finite: bool = True):
        super().__init__()
        self.seed = seed
        self.check_finite = check_finite
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device) -> torch.Generator:
        """The method's random stream on ``device``, seeded from ``seed`` (fresh entropy when seed is None).

        One generator per device, created on first use, so that a seeded method repeats exactly.
        """
        key = str(torch.device(device))
        if key not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream(s) from ``seed``."""
        self.seed = seed
        self._generators.clear()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """``enable_gqa=True``: grouped-query attention as SDPA defines it, k and v with Hkv heads where Hkv
        divides H; query head h reads key/value head h // (H / Hkv). Every method attends it by repeating the
        key/value heads (``repeat_interleave``, SDPA's own definition), so GQA equals the repeated heads exactly."""
        check_qkv(q, k, v, causal=causal, scale=scale, method=self.name, check_finite=self.check_finite,
                  enable_gqa=enable_gqa)
        if enable_gqa and k.shape[1] != q.shape[1]:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if causal and not self.supports_causal:
            raise ValueError(f"{self.name}: causal=True is not supported by this method")
        if not self.trainable and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise RuntimeError(f"{self.name} is inference-only (no gradient); call it under torch.no_grad() "
                               "or detach the inputs")
        if q.shape[0] == 0 or q.shape[1] == 0:
            # Empty batch or heads: nothing to attend, an empty (B, H, Nq, Dv) result as SDPA gives; written as
            # products of the empty inputs so that dtype, device and the autograd graph follow them.
            return torch.matmul(torch.matmul(q, k.transpose(-2, -1)), v)
        out = self.attend(q, k, v, causal, resolve_scale(scale, q.shape[-1]))
        if self.check_finite:
            check_finite_result(out, self.name)
        return out

    def attend(self, q, k, v, causal: bool, scale: float) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- incremental decoding (docs/DESIGN.md: state is an explicit object) -------------------------------
    def init_state(self) -> "KVCache":
        """A fresh decoding state. The default keeps every key and value (a KV cache); methods with a
        constant-size state (SRF) override this and :meth:`step`."""
        return KVCache()

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: "KVCache",
             scale: float | None = None) -> torch.Tensor:
        """Append the new tokens' keys/values to ``state`` and attend the new queries causally.

        q, k, v: (B, H, T, D) for T >= 1 new positions. Equals the causal forward over the whole prefix
        at those positions.
        """
        state.append(k, v)
        return self(q, state.keys, state.values, causal=True, scale=scale)

    @classmethod
    def budgets(cls, n_keys: int) -> list[dict]:
        """Option sets of increasing work for comparisons at sequence length ``n_keys`` (common.compare)."""
        return [{}]

    @classmethod
    def exact_options(cls, n_keys: int) -> dict | None:
        """Options under which the method computes exact attention on ``n_keys`` keys (to ``exact_tolerance``),
        or None when no budget does (the default). The contract suite (tests/contract) checks them."""
        return None

    @classmethod
    def option_names(cls) -> list[str]:
        """Keyword options the constructor accepts (for the registry's validation)."""
        names = []
        for klass in cls.__mro__:
            if klass is nn.Module or "__init__" not in klass.__dict__:
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                    names.append(p.name)
        return names

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in self.option_names() if hasattr(self, n))


class KVCache:
    """Keys and values of the positions decoded so far, shape (B, H, T, D) each; grows by concatenation."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.keys is None:
            self.keys, self.values = k, v
            return
        if k.shape[:2] != self.keys.shape[:2] or k.shape[-1] != self.keys.shape[-1] \
                or v.shape[-1] != self.values.shape[-1]:
            raise ValueError(f"KVCache: new keys {tuple(k.shape)} / values {tuple(v.shape)} do not match the "
                             f"cached {tuple(self.keys.shape)} / {tuple(self.values.shape)} in batch, heads or dims")
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)


@register("exact")
class ExactAttention(AttentionMethod):
    """Exact softmax attention through ``torch.nn.functional.scaled_dot_product_attention`` (eq. 1)."""

    name = "exact"

    @classmethod
    def exact_options(cls, n_keys):
        return {}

    def attend(self, q, k, v, causal, scale):
        nq, nk = q.shape[-2], k.shape[-2]
        if causal and nq != nk:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(nq, nk, q.device), scale=scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
