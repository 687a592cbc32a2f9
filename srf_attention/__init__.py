"""Simplex random feature attention (Reid et al., ICML 2023); importing it registers ``srf``."""
from .fast_attention import FastAttention, SRFAttention, SRFState  # noqa: F401  (registers "srf")
