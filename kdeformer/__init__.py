"""KDEformer (Zandieh et al., ICML 2023) and its baselines; modules land with issue 4."""
