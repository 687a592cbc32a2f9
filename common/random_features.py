"""Random features for the softmax kernel, written once for every method that uses them (srf, performer, sblocal,
tree's FAVOR+ estimators).

1. Random projections W (nb_features, head_dim): m vectors w_1..w_m, each marginally N(0, I_d), in three
   couplings (Reid, Choromanski, Likhosherstov, Weller, "Simplex Random Features", ICML 2023):

   - ``gaussian_random_matrix``: i.i.d. N(0, I_d) rows (Rahimi & Recht 2007; FAVOR+ with iid features).
   - ``orthogonal_random_matrix`` (ORF, Yu et al. 2016; Choromanski et al. 2021): within each block of d rows the
     directions are exactly orthogonal, the norms independent chi_d draws, so each row is still N(0, I_d).
   - ``simplex_random_matrix`` (SimRF, Reid et al. 2023, Sec. 3): within each block the d directions are the
     vertices of a regular simplex centred at the origin, pairwise cosine -1/(d-1), rotated by one Haar-random
     orthogonal matrix, with chi_d norms. The negative correlation lowers the MSE of the positive random feature
     kernel estimate below ORF's (their Sec. 3).

   When nb_features > d, independent blocks are stacked and the last one is cut to size. ``norm='chi'`` draws
   row norms from chi_d (unbiased kernel estimates); ``norm='fixed'`` sets every norm to sqrt(d), the Performer
   code's ``scaling=1`` variant (a little lower variance, no longer exactly unbiased).

2. The positive random feature map of FAVOR+ (Choromanski et al., "Rethinking Attention with Performers", ICLR
   2021, Lemma 1; Reid et al. 2023, eq. 1). For the softmax kernel K(q, k) = exp(S q.k):

       phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m),     x' = sqrt(S) x,

   so that E[phi(q) . phi(k)] = exp(q'.k') = exp(S q.k) whenever each w_i ~ N(0, I_d) marginally (iid, ORF and
   SimRF with chi norms all qualify). With S = 1/sqrt(d) the data is scaled by d^(-1/4), as in the papers.

   Stabiliser. exp overflows for large |W x'|; so every feature is multiplied by exp(-c) for an offset c:
   - queries: c is each query's own max over features (``offset='row'``); the factor is the same for the
     numerator and the denominator of that query and cancels exactly;
   - keys: c must be one number shared by all keys a query reads, or the ratio changes. ``offset='global'`` takes
     the max over all keys and features of each (batch, head); recurrent decoding carries that maximum as
     ``key_maxima`` and passes it back as a tensor offset, rescaling its state when a new key exceeds it.

3. The closed-form variance of that estimator with iid rows (Choromanski et al. 2021, Lemma 2):
   ``favor_relative_variance``.
"""
from __future__ import annotations

import math

import torch


FEATURE_TYPES = ("simplex", "orthogonal", "iid")
NORMS = ("chi", "fixed")


def _check(nb_features: int, head_dim: int, norm: str, name: str) -> None:
    for arg, value in (("nb_features", nb_features), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be an int >= 1, got {value!r}")
    if norm not in NORMS:
        raise ValueError(f"{name}: unknown norm {norm!r}; expected one of {NORMS}")


def _row_norms(n: int, d: int, norm: str, generator, dtype, device) -> torch.Tensor:
    if norm == "fixed":
        return torch.full((n,), math.sqrt(d), dtype=dtype, device=device)
    # chi_d = the length of a d-dimensional standard Gaussian vector
    return torch.randn(n, d, generator=generator, dtype=dtype, device=device).norm(dim=1)


def haar_orthogonal(d: int, generator=None, dtype=torch.float64, device="cpu", count: int | None = None) -> torch.Tensor:
    """A Haar-distributed random orthogonal d x d matrix (QR of a Gaussian matrix with the sign fix of
    Mezzadri 2007, so that the distribution is exactly uniform); ``count`` independent ones as (count, d, d).

    The batch is drawn and factorised in one call: many tiny QRs in a Python loop are far slower."""
    g = torch.randn(1 if count is None else count, d, d, generator=generator, dtype=dtype, device=device)
    qm, r = torch.linalg.qr(g)
    qm = qm * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return qm[0] if count is None else qm


def simplex_directions(d: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """d unit vectors in R^d with pairwise inner product -1/(d-1): the vertices of a regular simplex.

    Built as the normalised rows of the centring matrix I - 11^T/d: row i is e_i - 1/d, with squared norm
    1 - 1/d and inner product -1/d with any other row, so the cosine is -1/(d-1). For d = 1 the single
    direction is +1.
    """
    if d == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    s = torch.eye(d, dtype=dtype, device=device) - 1.0 / d
    return s / s.norm(dim=1, keepdim=True)


def _stack_blocks(blocks: torch.Tensor, nb_features: int) -> torch.Tensor:
    """(n_blocks, d, d) -> the first nb_features rows of the blocks stacked on top of each other."""
    return blocks.reshape(-1, blocks.shape[-1])[:nb_features]


def _block_count(nb_features: int, d: int) -> int:
    return -(-nb_features // d)


def gaussian_random_matrix(nb_features: int, head_dim: int, generator=None, dtype=torch.float32,
                           device="cpu", norm: str = "chi") -> torch.Tensor:
    """(nb_features, head_dim) matrix of i.i.d. N(0, 1) entries (``norm='fixed'`` rescales rows to sqrt(d))."""
    _check(nb_features, head_dim, norm, "gaussian_random_matrix")
    w = torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64, device=device)
    if norm == "fixed":
        w = w / w.norm(dim=1, keepdim=True) * math.sqrt(head_dim)
    return w.to(dtype)


def orthogonal_random_matrix(nb_features: int, head_dim: int, generator=None, dtype=torch.float32,
                             device="cpu", norm: str = "chi") -> torch.Tensor:
    """(nb_features, head_dim) ORF matrix: blocks of d exactly orthogonal directions with chi_d norms."""
    _check(nb_features, head_dim, norm, "orthogonal_random_matrix")
    d = head_dim
    directions = _stack_blocks(haar_orthogonal(d, generator, device=device, count=_block_count(nb_features, d)),
                               nb_features)
    norms = _row_norms(nb_features, d, norm, generator, torch.float64, device)
    return (directions * norms.unsqueeze(1)).to(dtype)


def simplex_random_matrix(nb_features: int, head_dim: int, generator=None, dtype=torch.float32,
                          device="cpu", norm: str = "chi") -> torch.Tensor:
    """(nb_features, head_dim) SimRF matrix (Reid et al. 2023, Sec. 3): per block, the regular-simplex directions
    rotated by an independent Haar orthogonal matrix, times chi_d norms."""
    _check(nb_features, head_dim, norm, "simplex_random_matrix")
    d = head_dim
    base = simplex_directions(d, device=device)
    rotations = haar_orthogonal(d, generator, device=device, count=_block_count(nb_features, d))
    directions = _stack_blocks(base @ rotations, nb_features)
    norms = _row_norms(nb_features, d, norm, generator, torch.float64, device)
    return (directions * norms.unsqueeze(1)).to(dtype)


def random_matrix(feature_type: str, nb_features: int, head_dim: int, generator=None, dtype=torch.float32,
                  device="cpu", norm: str = "chi") -> torch.Tensor:
    """Dispatch on ``feature_type`` in ('simplex', 'orthogonal', 'iid')."""
    makers = {"simplex": simplex_random_matrix, "orthogonal": orthogonal_random_matrix,
              "iid": gaussian_random_matrix}
    if feature_type not in makers:
        raise ValueError(f"random_matrix: unknown feature_type {feature_type!r}; expected one of {FEATURE_TYPES}")
    return makers[feature_type](nb_features, head_dim, generator=generator, dtype=dtype, device=device, norm=norm)


def positive_random_features(x: torch.Tensor, projection: torch.Tensor, scale: float,
                             offset: str | torch.Tensor = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """phi(x) * exp(-c) for x of shape (..., N, d) and projection W of shape (m, d); returns (features, c).

    ``offset``: 'row' (c per row, for queries), 'global' (c per leading index over the last two dims, for
    keys) or a tensor broadcastable to (..., 1, 1) (a carried key maximum). Features have shape (..., N, m).
    Computed in float32 at least (bfloat16/float16 inputs are upcast for the exp and cast back).
    """
    if projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        raise ValueError(f"positive_random_features: projection must have shape (m, {x.shape[-1]}), "
                         f"got {tuple(projection.shape)}")
    work_dtype = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(work_dtype) * math.sqrt(scale)
    w = projection.to(device=x.device, dtype=work_dtype)
    logits = xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)
    if isinstance(offset, torch.Tensor):
        c = offset.to(work_dtype)
    elif offset == "row":
        c = logits.amax(dim=-1, keepdim=True).detach()
    elif offset == "global":
        c = logits.amax(dim=(-2, -1), keepdim=True).detach()
    else:
        raise ValueError(f"positive_random_features: offset must be 'row', 'global' or a tensor, got {offset!r}")
    feats = torch.exp(logits - c) / math.sqrt(projection.shape[0])
    return feats.to(x.dtype) if x.dtype in (torch.float16, torch.bfloat16) else feats, c


def favor_relative_variance(sum_sq_norm, nb_features: int):
    """Var[K^] / K^2 of the FAVOR+ estimate K^ = phi(x).phi(y) of K = exp(x.y) with m i.i.d. positive random
    features (Choromanski et al. 2021, Lemma 2: MSE = exp(2 x.y) (exp(|x + y|^2) - 1) / m, with K^2 = exp(2 x.y)):

        Var[K^] / K^2 = (exp(|x + y|^2) - 1) / m.

    ``sum_sq_norm`` is |x + y|^2 in the kernel's own coordinates, i.e. S |q + k|^2 = S (|q|^2 + |k|^2 + 2 q.k)
    for the softmax kernel exp(S q.k): a float (returns a float) or a tensor (returns a tensor, elementwise). The
    estimator is unbiased, so this is also its normalised MSE E[(K^ - K)^2] / K^2; its square root is the
    std / mean ratio. ORF and SimRF couplings have a lower variance than this (Theorem 2 there; Reid et al. Sec. 3).
    """
    if isinstance(nb_features, bool) or not isinstance(nb_features, int) or nb_features < 1:
        raise ValueError(f"favor_relative_variance: nb_features must be an int >= 1, got {nb_features!r}")
    if isinstance(sum_sq_norm, torch.Tensor):
        return torch.expm1(sum_sq_norm) / nb_features
    return math.expm1(sum_sq_norm) / nb_features
