"""Real attention inputs: the queries, keys and values of the small GPT trained on tiny Shakespeare.

    x = shakespeare_qkv(4096)            # QKV of shapes (1, H, 4096, D), the last layer of the quick model

The model's block is short (64 tokens), so consecutive blocks of the validation text are run through the model
and the q/k/v of one layer are joined along the sequence (``capture_qkv`` takes them at the input of the layer's
attention method, i.e. what any method in its place would receive).
"""
from __future__ import annotations

import math

import torch

from common.data import QKV

from .capture_qkv import capture_qkv
from .data_loader import load_split
from .quick_model import get_quick_model


def shakespeare_qkv(n: int, layer: int = -1, dtype=torch.float32, device="cpu", progress: bool = True) -> QKV:
    """Real q/k/v (1, H, n, D) of ``layer`` of the quick nanoGPT model on the first n validation tokens."""
    if n < 1:
        raise ValueError(f"shakespeare_qkv: n must be >= 1, got {n}")
    model, _ = get_quick_model(device="cpu", progress=progress)
    block = model.config.block_size
    n_blocks = math.ceil(n / block)
    val = torch.as_tensor(load_split("val")[: n_blocks * block].astype("int64"))
    if val.numel() < n_blocks * block:
        raise ValueError(f"shakespeare_qkv: the validation split has {val.numel()} tokens, fewer than n={n}")
    layer = layer % model.config.n_layer
    q, k, v = capture_qkv(model, val.view(n_blocks, block), layer)  # (n_blocks, H, block, D)
    join = lambda t: t.permute(1, 0, 2, 3).reshape(1, t.shape[1], n_blocks * block, t.shape[-1])[:, :, :n]
    return QKV(*(join(t).to(dtype=dtype, device=device) for t in (q, k, v)),
               source=f"nanoGPT quick model, layer {layer}, {n_blocks} validation blocks of {block} tokens")
