"""Performer (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021): FAVOR+ attention.

FAVOR+ estimates the softmax kernel with positive random features (their Lemma 1) whose projections are
orthogonal random features (ORFs: exactly orthogonal directions within each block of D rows, chi_D norms), which
lower the estimator's MSE below that of iid features (their Theorem 2), and computes attention in linear time
(their Sec. 2; causal by prefix sums). It is a baseline of KDEformer's experiments. It lives here because it is
simplex random features (``fast_attention.py``) with another coupling of the projection rows, so one class serves
both. ``redraw=True`` draws new features at every training call (Performer's feature redrawing); otherwise the
features are drawn once, from ``seed``.
"""
from common.registry import register

from .fast_attention import SRFAttention


@register("performer")
class PerformerAttention(SRFAttention):
    """FAVOR+ with orthogonal random features; options as ``srf`` (nb_features, chunk_size, norm, redraw, seed)."""

    feature_type = "orthogonal"
