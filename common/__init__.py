"""Shared contract of the repository: exact attention, the method registry, metrics, data, timing, plots.

    import common
    attn = common.get_attention("knn", seed=0)
    out = attn(q, k, v, causal=False, scale=None)
"""
from .attention import (AttentionMethod, ExactAttention, KVCache, allowed_key_counts, attention_scores,
                        attention_weights, causal_mask, gather_rows, softmax_attention)
from .registry import available, get_attention, method_class, register
from .validation import check_qkv
from . import baselines  # noqa: F401  (registers "uniform")

__all__ = ["AttentionMethod", "ExactAttention", "KVCache", "allowed_key_counts", "attention_scores", "gather_rows", "attention_weights", "available",
           "causal_mask", "check_qkv", "get_attention", "method_class", "register", "softmax_attention"]
