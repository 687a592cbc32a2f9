"""Performer (Choromanski et al., "Rethinking Attention with Performers", ICLR 2021): FAVOR+ attention.

FAVOR+ estimates the softmax kernel with positive random features (their Lemma 1, eq. 7) whose projections are
orthogonal random features (ORFs, their Sec. 2.4 and Theorem 2: exactly orthogonal directions within each block
of D rows, chi_D norms), and computes attention in linear time (their eq. 4; causal by prefix sums, Sec. 2.6).
It is the baseline of KDEformer's experiments. The implementation is the one of simplex random features
(``srf_attention.fast_attention``): the two methods differ only in the coupling of the projection rows, so one
class serves both. ``redraw=True`` draws new features at every training call (their Sec. 4, "feature
redrawing"); otherwise the features are drawn once, from ``seed``.
"""
from common.registry import register
from srf_attention.fast_attention import SRFAttention


@register("performer")
class PerformerAttention(SRFAttention):
    """FAVOR+ with orthogonal random features; options as ``srf`` (nb_features, chunk_size, norm, redraw, seed)."""

    feature_type = "orthogonal"
