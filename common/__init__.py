"""Shared contract of the repository: exact attention, the method registry, metrics, data, timing, plots.

    import common
    attn = common.get_attention("knn", seed=0)
    out = attn(q, k, v, causal=False, scale=None)
    out, lse = attn(q, k, v, key_padding_mask=padded, return_lse=True)   # masks and the log-normaliser
"""
from .attention import (AttentionMethod, ExactAttention, KVCache, allowed_key_counts, attention_scores,
                        attention_weights, attention_with_lse, causal_mask, causal_query_positions, gather_rows,
                        key_padding_from_attn_mask, output_and_lse, softmax_attention)
from .registry import available, budget_options, get_attention, method_class, method_options, methods, register
from .validation import NonFiniteError, check_qkv
from . import baselines  # noqa: F401  (registers "uniform")

__all__ = ["AttentionMethod", "ExactAttention", "KVCache", "allowed_key_counts", "attention_scores", "attention_weights",
           "attention_with_lse", "available", "budget_options", "causal_mask", "causal_query_positions", "check_qkv",
           "gather_rows", "get_attention", "key_padding_from_attn_mask", "method_class", "method_options", "methods",
           "NonFiniteError", "output_and_lse", "register", "softmax_attention"]
