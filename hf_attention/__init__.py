"""Every attention method of this repository inside Hugging Face transformers models (issue 15).

    import hf_attention
    hf_attention.register()                                         # attn_implementation="knn", "srf", ...
    hf_attention.register_layers("knn_first2", {0: ("knn", {"k": 32}), 1: "knn"})   # the other layers: exact

See hf_attention/README.md. The package sits above ``common`` and the method packages (``common`` never imports
it) and needs transformers (the ``[hf]`` extra).
"""
from .adapter import LayerChoice, MaskPlan, register, register_layers, split_mask

__all__ = ["LayerChoice", "MaskPlan", "register", "register_layers", "split_mask"]
