"""KDEformer (Zandieh, Han, Daliri, Karbasi, "KDEformer: Accelerating Transformers via Kernel Density Estimation",
ICML 2023, arXiv 2302.02451) and the baselines of its experiments: Reformer and ScatterBrain here, Performer in
``performer.py`` (one implementation with ``srf_attention``).
"""
import importlib.util

from . import kdeformer, reformer, scatterbrain  # noqa: F401  (register kdeformer, reformer, sblocal)

if importlib.util.find_spec("kdeformer.performer") is not None:
    from . import performer  # noqa: F401  (registers "performer")
