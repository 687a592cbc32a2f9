"""Simplex random feature attention (Reid et al., ICML 2023) and Performer's FAVOR+ (Choromanski et al., ICLR 2021,
the same estimator with orthogonal features); importing it registers ``srf`` and ``performer``.

The seed's usage ``from srf_attention import FastAttention, simplex_random_matrix`` works as written: the second
name is the seed's signature (``rfs.py``) over ``common.random_features``, where the projections live.
"""
from .fast_attention import FastAttention, SRFAttention, SRFState  # noqa: F401  (registers "srf")
from .performer import PerformerAttention  # noqa: F401  (registers "performer")
from .rfs import simplex_random_matrix  # noqa: F401
