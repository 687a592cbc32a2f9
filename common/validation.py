"""Input checking shared by every attention method (docs/DESIGN.md, "The one contract").

Every method calls :func:`check_qkv` once at its entry, so that a wrong shape, dtype, device or a
non-finite value gives the same clear message whichever method the user picked.

Causal convention when Nq != Nk (the "bottom-right" alignment of a KV cache): the Nq queries are
the *last* Nq positions of the Nk-long sequence, so query i may read key j iff j <= i + (Nk - Nq).
This needs Nq <= Nk.
"""
from __future__ import annotations

import math

import torch


class NonFiniteError(RuntimeError):
    """A method produced a non-finite value (nan or inf) from finite inputs: a numerical failure of the method
    (overflow, 0/0), never silently returned (docs/DESIGN.md, "Numerics and dtypes")."""


def check_finite_result(t: torch.Tensor, method: str, what: str = "output") -> torch.Tensor:
    """Return ``t`` if every entry is finite, else raise :class:`NonFiniteError` naming ``method`` and ``what``."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise NonFiniteError(f"{method}: {what} has {bad} non-finite value(s) (nan or inf) although the inputs are "
                             f"finite (dtype {t.dtype}); this is a numerical failure of {method}, please report it")
    return t


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, method: str = "attention", check_finite: bool = True,
              enable_gqa: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` naming ``method`` and the argument if the inputs break the contract.

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv); same floating dtype and device; Nq, Nk >= 1;
    causal needs Nq <= Nk; scale, when given, is a positive finite number. With ``enable_gqa`` (grouped-query
    attention, as SDPA) k and v may have Hkv heads where Hkv divides q's H.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{method}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{method}: {name} must have shape (B, H, N, D) (rank 4), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{method}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{method}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype} "
                        "(cast them yourself; nothing is cast silently)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{method}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{method}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if enable_gqa and q.shape[0] == k.shape[0] and k.shape[:2] == v.shape[:2]:
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"{method}: enable_gqa=True needs the key/value heads Hkv to divide the query heads H, "
                             f"got H={q.shape[1]}, Hkv={k.shape[1]}")
    elif q.shape[:2] != k.shape[:2] or k.shape[:2] != v.shape[:2]:
        raise ValueError(f"{method}: batch and head dims must match exactly (no broadcasting), got "
                         f"q {tuple(q.shape[:2])}, k {tuple(k.shape[:2])}, v {tuple(v.shape[:2])}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{method}: q and k must have the same head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{method}: k and v must have the same sequence length Nk, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{method}: empty sequence: Nq={q.shape[2]}, Nk={k.shape[2]}; both must be >= 1")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"{method}: head dims must be >= 1, got D={q.shape[-1]}, Dv={v.shape[-1]}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"{method}: causal=True needs Nq <= Nk (queries are the last Nq positions), "
                         f"got Nq={q.shape[2]} > Nk={k.shape[2]}")
    if scale is not None:
        check_scale(scale, method)
    if check_finite:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{method}: {name} contains non-finite values (nan or inf)")


def check_masks(q: torch.Tensor, k: torch.Tensor, *, attn_mask=None, key_padding_mask=None, return_lse=False,
                method: str = "attention") -> None:
    """Raise naming ``method`` and the argument if a mask or ``return_lse`` breaks the contract (docs/DESIGN.md,
    "Masks and log-normaliser"); q (B, H, Nq, D), k (B, Hkv, Nk, D) already checked by :func:`check_qkv`.

    ``key_padding_mask``: a bool tensor of shape exactly (B, Nk), True marking a padded key (the convention of
    ``torch.nn.MultiheadAttention``). ``attn_mask``: SDPA's, a bool tensor (True = may attend) or an additive
    float tensor of q's dtype (0 where allowed, -inf where not; no nan, no +inf), of rank <= 4 and broadcastable to
    (B, H, Nq, Nk) under PyTorch's broadcasting (each of its trailing dims is 1 or the target's). Both on q's
    device. Nothing is cast: a wrong dtype is an error.
    """
    b, h, nq = q.shape[:3]
    nk = k.shape[2]
    if not isinstance(return_lse, bool):
        raise TypeError(f"{method}: return_lse must be a bool, got {type(return_lse).__name__}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{method}: key_padding_mask must be a torch.Tensor or None, "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{method}: key_padding_mask must be a bool tensor (True = padded key), got dtype "
                            f"{key_padding_mask.dtype} (nothing is cast silently)")
        if tuple(key_padding_mask.shape) != (b, nk):
            raise ValueError(f"{method}: key_padding_mask must have shape (B, Nk) = {(b, nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"{method}: key_padding_mask must be on q's device {q.device}, "
                             f"got {key_padding_mask.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{method}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(f"{method}: attn_mask must be a bool tensor (True = may attend) or an additive float "
                            f"tensor of q's dtype {q.dtype}, got dtype {attn_mask.dtype} (nothing is cast silently)")
        target = (b, h, nq, nk)
        if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(reversed(attn_mask.shape), reversed(target))):
            raise ValueError(f"{method}: attn_mask must be broadcastable to (B, H, Nq, Nk) = {target}, "
                             f"got shape {tuple(attn_mask.shape)}")
        if attn_mask.device != q.device:
            raise ValueError(f"{method}: attn_mask must be on q's device {q.device}, got {attn_mask.device}")
        if attn_mask.is_floating_point() and (attn_mask.isnan().any() or (attn_mask == float("inf")).any()):
            raise ValueError(f"{method}: attn_mask (additive) contains nan or +inf; use -inf for a masked entry")


def check_scale(scale, method: str = "attention") -> float:
    """Return ``scale`` as a float if it is a positive finite real number, else raise naming it."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{method}: scale must be a positive float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{method}: scale must be a positive finite float, got {scale}")
    return float(scale)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax temperature: ``scale`` if given, else 1/sqrt(D) as in Vaswani et al. (2017), eq. 1."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_int(value, name: str, method: str, *, minimum: int | None = None) -> int:
    """Check an integer option (bools refused) against an optional lower bound; return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{method}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{method}: {name} must be >= {minimum}, got {value}")
    return value


def check_choice(value, name: str, method: str, choices) -> str:
    """Check that ``value`` is one of ``choices``; the error lists them."""
    if value not in choices:
        raise ValueError(f"{method}: unknown {name} {value!r}; expected one of {sorted(choices)}")
    return value
