"""Simplex random feature attention (Reid et al., ICML 2023)."""
