"""KDEformer (Zandieh, Han, Daliri, Karbasi, "KDEformer: Accelerating Transformers via Kernel Density Estimation",
ICML 2023, arXiv 2302.02451) and the baselines of its experiments: Reformer and ScatterBrain here; Performer is
registered by ``srf_attention`` (it is SRF with orthogonal features) and reached by name through ``common``.
"""
from . import kdeformer, reformer, scatterbrain  # noqa: F401  (register kdeformer, reformer, sblocal)
