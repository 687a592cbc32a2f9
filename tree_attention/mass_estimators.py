"""Estimates of a subtree's attention mass pm, the weights that steer the tree descent.

For a query q (per head) and a subtree with key sum sk, count c and position span, ``method`` gives pm >= 0
(summed over heads, so the heads share one descent; leaves get pm = 0 in the descent itself):

- ``alignment``: exp(S q . sk / c), the score of the subtree's mean key;
- ``positive_alignment``: the same on the features f(x) = [ReLU(x), ReLU(-x)] (non-negative coordinates);
- ``FAVOR+``: the subtree mean of phi(q) . phi(k), phi the positive orthogonal random features of FAVOR+
  (R features; an unbiased estimate of the mean of exp(S q . k) over the subtree);
- ``FAVOR+ReLU``: the mean of phi(q) . phi(k) with ReLU random features of the unit-normalised vectors
  (constant norm; Choromanski et al. 2021, Sec. 4);
- ``RandomFourierFeatures``: the mean of the trigonometric estimate (Rahimi & Recht 2007) of
  exp(S q . k) = exp(|q'|^2 / 2) exp(|k'|^2 / 2) exp(-|q' - k'|^2 / 2); it can be negative and is clamped at 0;
  R must be even (cos / sin pairs);
- ``uniform``: 1;
- ``time-decay``: sum over the subtree's positions p <= t of base^(t - p) (recent tokens weigh more).

Each estimator is linear in per-key quantities (``key_features``), so a subtree's estimate needs only the sum of
those quantities over the subtree, which the tree keeps.
"""
from __future__ import annotations

import math

import torch

from srf_attention.feature_map import positive_random_features
from srf_attention.features import orthogonal_random_matrix

METHODS = ("alignment", "positive_alignment", "FAVOR+", "FAVOR+ReLU", "RandomFourierFeatures", "uniform",
           "time-decay", "tree-less")
FEATURE_METHODS = ("positive_alignment", "FAVOR+", "FAVOR+ReLU", "RandomFourierFeatures")


class MassEstimator:
    """pm of subtrees for one method; ``projection`` holds the random features (drawn once, from a generator)."""

    def __init__(self, method: str, head_dim: int, scale: float, R: int = 64, base: float = 0.9,
                 generator: torch.Generator | None = None):
        if method not in METHODS:
            raise ValueError(f"tree: unknown method {method!r}; expected one of {METHODS}")
        if method in ("FAVOR+", "FAVOR+ReLU", "RandomFourierFeatures") and (isinstance(R, bool) or R < 1):
            raise ValueError(f"tree: R must be >= 1 for {method}, got {R}")
        if method == "RandomFourierFeatures" and R % 2:
            raise ValueError(f"tree: RandomFourierFeatures needs an even R (cos/sin pairs), got R={R}")
        if method == "time-decay" and not 0 < base < 1:
            raise ValueError(f"tree: time-decay needs 0 < base < 1, got {base}")
        self.method, self.scale, self.base = method, scale, base
        n_proj = R // 2 if method == "RandomFourierFeatures" else R
        self.projection = None
        if method in ("FAVOR+", "FAVOR+ReLU", "RandomFourierFeatures"):
            self.projection = orthogonal_random_matrix(n_proj, head_dim, generator=generator, dtype=torch.float64)

    @property
    def uses_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def _proj(self, x):
        return self.projection.to(device=x.device, dtype=x.dtype)

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        """Per-key quantities whose subtree sums determine pm: (..., N, F)."""
        if self.method == "positive_alignment":
            return torch.cat([torch.relu(k), torch.relu(-k)], -1)
        if self.method == "FAVOR+":
            # one fixed offset (0) for all keys, so that sums over any subtree stay comparable
            return positive_random_features(k, self._proj(k), self.scale, offset=torch.zeros((), dtype=k.dtype))[0]
        if self.method == "FAVOR+ReLU":
            unit = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return torch.relu(unit @ self._proj(k).T) / math.sqrt(self.projection.shape[0])
        ks = k * math.sqrt(self.scale)
        wk = ks @ self._proj(k).T
        amp = torch.exp(0.5 * (ks * ks).sum(-1, keepdim=True))
        return amp * torch.cat([torch.cos(wk), torch.sin(wk)], -1) / math.sqrt(self.projection.shape[0])

    def query_features(self, q: torch.Tensor) -> torch.Tensor:
        if self.method == "positive_alignment":
            return torch.cat([torch.relu(q), torch.relu(-q)], -1)
        if self.method == "FAVOR+":
            return positive_random_features(q, self._proj(q), self.scale, offset=torch.zeros((), dtype=q.dtype))[0]
        if self.method == "FAVOR+ReLU":
            unit = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return torch.relu(unit @ self._proj(q).T) / math.sqrt(self.projection.shape[0])
        qs = q * math.sqrt(self.scale)
        wq = qs @ self._proj(q).T
        amp = torch.exp(0.5 * (qs * qs).sum(-1, keepdim=True))
        return amp * torch.cat([torch.cos(wq), torch.sin(wq)], -1) / math.sqrt(self.projection.shape[0])

    def log_mass(self, q, sum_k, sum_feat, count, start, stop, position) -> torch.Tensor:
        """log pm per (query, bud), summed over heads. Shapes: q (B, H, n, D); sum_k (B, H, n, c, D);
        sum_feat (B, H, n, c, F) or None; count, start, stop (B, n, c) (stop exclusive, clipped to the prefix);
        position (n,). Returns (B, n, c); -inf where count is 0."""
        empty = count == 0
        c = count.clamp_min(1).to(q.dtype)
        if self.method == "uniform":
            log_pm = torch.zeros_like(c)
        elif self.method == "time-decay":
            age_newest = (position.view(1, -1, 1) - (stop - 1)).to(q.dtype)  # t - (last position in the span)
            log_pm = age_newest * math.log(self.base) + torch.log((1 - self.base ** c) / (1 - self.base))
        elif self.method == "alignment":
            log_pm = torch.logsumexp(self.scale * torch.einsum("bhnd,bhncd->bhnc", q, sum_k) / c.unsqueeze(1), dim=1)
        elif self.method == "positive_alignment":
            fq = self.query_features(q)
            log_pm = torch.logsumexp(self.scale * torch.einsum("bhnf,bhncf->bhnc", fq, sum_feat) / c.unsqueeze(1),
                                     dim=1)
        else:
            mean = torch.einsum("bhnf,bhncf->bhnc", self.query_features(q), sum_feat) / c.unsqueeze(1)
            log_pm = torch.log(mean.clamp_min(0).sum(1))
        return log_pm.masked_fill(empty, float("-inf"))
