"""Estimates of a subtree's attention mass pm, the weights that steer the tree descent.

For a query q (per head) and a subtree with key sum sk, count c and position span, ``method`` gives pm >= 0
(summed over heads, so the heads share one descent). As in the report, a subtree with at most one visible key (a
leaf) has pm = 0: there is nothing below it to find. With x' = sqrt(S) x (so that x' . y' = S x . y):

- ``alignment``: exp(S q . sk / c), the score of the subtree's mean key;
- ``positive_alignment``: the same on the features f(x) = [ReLU(x), ReLU(-x)] (non-negative coordinates);
- ``FAVOR+``: the subtree mean of phi(q) . phi(k) with the positive random features of FAVOR+
  phi(x) = exp(w_r . x' - |x'|^2 / 2) / sqrt(R) (Choromanski et al. 2021, "Rethinking attention with Performers",
  Lemma 1; ``common.random_features.positive_random_features``), here in the report's antithetic ("hyperbolic")
  form: R / 2 orthogonal directions w and their negatives -w, so R must be even; an unbiased estimate of the mean
  of exp(S q . k) over the subtree;
- ``FAVOR+ReLU``: the mean of phi(q) . phi(k) with phi(x) = ReLU(w_r . x')^p / sqrt(R), the w_r orthogonal with
  constant norm sqrt(D) (Choromanski et al. 2021, Sec. 4, generalised attention), antithetic pairs as above
  (R even), p = ``relu_power`` (1; the kernel analysis varies it);
- ``RandomFourierFeatures``: the mean of the trigonometric estimate (Rahimi & Recht 2007) of
  exp(x' . y') = exp(|x'|^2 / 2) exp(|y'|^2 / 2) exp(-|x' - y'|^2 / 2), with R / 2 frequencies and a cos / sin
  pair each (R even); it can be negative and is clamped at 0;
- ``uniform``: 1;
- ``time-decay``: sum over the subtree's positions p <= t of base^(t - p) (recent tokens weigh more).

Each estimator is linear in per-key quantities (``features``), so a subtree's estimate needs only the sum of
those quantities over the subtree, which the tree keeps.

Stabiliser (FAVOR+ and RandomFourierFeatures, whose features hold exponentials that overflow at large scores):
:meth:`MassEstimator.log_scaled_features` returns phi(x) exp(-c) and the offset c, c = each query's own maximum
(``'row'``) or one maximum over all keys of a (batch, head) (``'global'``: one factor shared by every subtree sum
that a query compares, so it changes no ratio between buds). Because pm is summed over heads, the offsets of the
query and of the keys, which differ between heads, are added back in the log domain before the heads are summed:
log pm = logsumexp_h (log mean_h + c_q,h + c_k,h) (:meth:`MassEstimator.log_mass`). That is the same pm as without
the stabiliser (up to rounding) and stays finite for scores up to 1e4. The descent computes all of this in float32
at least (``np_attention.TreeAttention`` upcasts float16 / bfloat16 inputs).
"""
from __future__ import annotations

import math

import torch

from common.random_features import positive_random_features, random_matrix

METHODS = ("alignment", "positive_alignment", "FAVOR+", "FAVOR+ReLU", "RandomFourierFeatures", "uniform",
           "time-decay", "tree-less")
RANDOM_FEATURE_METHODS = ("FAVOR+", "FAVOR+ReLU", "RandomFourierFeatures")
FEATURE_METHODS = ("positive_alignment", *RANDOM_FEATURE_METHODS)


class MassEstimator:
    """pm of subtrees for one method; ``projection`` holds the random features (drawn once, from a generator, on
    the generator's device)."""

    def __init__(self, method: str, head_dim: int, scale: float, R: int = 64, base: float = 0.9,
                 generator: torch.Generator | None = None, orthogonal: bool = True, relu_power: float = 1.0):
        if method not in METHODS:
            raise ValueError(f"tree: unknown method {method!r}; expected one of {METHODS}")
        if method in RANDOM_FEATURE_METHODS:
            if isinstance(R, bool) or not isinstance(R, int) or R < 2 or R % 2:
                raise ValueError(f"tree: {method} needs an even R >= 2 (antithetic or cos/sin feature pairs), "
                                 f"got R={R!r}")
        if method == "time-decay" and not 0 < base < 1:
            raise ValueError(f"tree: time-decay needs 0 < base < 1, got {base}")
        if relu_power != 1.0 and method != "FAVOR+ReLU":
            raise ValueError(f"tree: relu_power applies to FAVOR+ReLU only, got {relu_power} for {method}")
        if not relu_power > 0:
            raise ValueError(f"tree: relu_power must be > 0, got {relu_power}")
        self.method, self.scale, self.base, self.relu_power = method, scale, base, relu_power
        self.projection = None
        if method in RANDOM_FEATURE_METHODS:
            device = "cpu" if generator is None else generator.device  # drawn where the generator lives
            w = random_matrix("orthogonal" if orthogonal else "iid", R // 2, head_dim, generator=generator,
                              dtype=torch.float64, device=device, norm="fixed" if method == "FAVOR+ReLU" else "chi")
            # FAVOR+ and FAVOR+ReLU: the directions w and -w; RandomFourierFeatures: cos and sin of each w . x
            self.projection = w if method == "RandomFourierFeatures" else torch.cat([w, -w])

    @property
    def uses_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) (..., F) of keys or queries: the subtree sums of phi(k) and phi(q) give the estimate."""
        phi, c = self.log_scaled_features(x, "row")
        return phi * torch.exp(c)

    def log_scaled_features(self, x: torch.Tensor, offset: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
        """(phi(x) exp(-c), c) with phi(x) = phi(x) exp(-c) exp(c) (module docstring, stabiliser); ``offset``:
        'row' (c (..., N, 1), per query) or 'global' (c (..., 1, 1), one per leading index, for keys). c = 0 (a
        scalar) for the feature maps without exponentials (positive_alignment, FAVOR+ReLU)."""
        if self.method == "positive_alignment":
            return torch.cat([torch.relu(x), torch.relu(-x)], -1), x.new_zeros(())
        n_rows = self.projection.shape[0]  # R for FAVOR+ / FAVOR+ReLU, R / 2 frequencies for RandomFourierFeatures
        if self.method == "FAVOR+":
            return positive_random_features(x, self.projection, self.scale, offset)
        xs = x * math.sqrt(self.scale)
        wx = xs @ self.projection.to(device=x.device, dtype=x.dtype).T
        if self.method == "FAVOR+ReLU":
            return torch.relu(wx) ** self.relu_power / math.sqrt(n_rows), x.new_zeros(())
        # cos(w . x) cos(w . y) + sin(w . x) sin(w . y) = cos(w . (x - y)): the mean over the R / 2 frequencies,
        # times the amplitude exp(|x'|^2 / 2) of each side, kept as log amplitude minus its offset
        log_amp = 0.5 * (xs * xs).sum(-1, keepdim=True)
        c = log_amp if offset == "row" else log_amp.amax(dim=(-2, -1), keepdim=True)
        return torch.exp(log_amp - c) * torch.cat([torch.cos(wx), torch.sin(wx)], -1) / math.sqrt(n_rows), c

    @property
    def score_source(self) -> str | None:
        """Which subtree sum the pm reads through an inner product: 'k' (q . sum_k), 'feat' (phi(q) . sum phi(k))
        or None (uniform, time-decay: no inner product)."""
        return "k" if self.method == "alignment" else "feat" if self.uses_features else None

    def log_mass(self, score, count, start, stop, position, log_offset=0.0) -> torch.Tensor:
        """log pm per (query, bud), summed over heads. score (B, H, n, c): the buds' inner products of
        ``score_source`` (None for uniform / time-decay); count, start, stop (B, n, c) (stop exclusive, clipped to
        the prefix); position (n,); log_offset: c_q + c_k of the stabilised features (B, H, n, 1), broadcastable
        (module docstring). Returns (B, n, c); -inf (pm 0) where count <= 1 (nothing below to find)."""
        final = count <= 1
        c = count.clamp_min(1)
        if self.method == "uniform":
            log_pm = torch.zeros(count.shape, dtype=torch.float64, device=count.device)
        elif self.method == "time-decay":
            age_newest = (position.view(1, -1, 1) - (stop - 1)).double()  # t - (last position in the span)
            log_pm = age_newest * math.log(self.base) + torch.log((1 - self.base ** c.double()) / (1 - self.base))
        elif self.method in ("alignment", "positive_alignment"):  # exp(S <q, mean key>), features for positive_
            log_pm = torch.logsumexp(self.scale * score / c.unsqueeze(1).to(score.dtype), dim=1)
        else:  # the subtree mean of phi(q) . phi(k) (clamped at 0: RandomFourierFeatures can be negative)
            mean = (score / c.unsqueeze(1).to(score.dtype)).clamp_min(0)
            log_pm = torch.logsumexp(torch.log(mean) + log_offset, dim=1)
        return log_pm.masked_fill(final, float("-inf"))
