"""The real queries, keys and values of one layer of a trained GPT, for comparing attention methods on them.

    q, k, v = capture_qkv(model, "ROMEO: ...", layer=3, meta=meta)    # each (B, H, T, D)

They are the inputs the layer hands to its attention method (after the q/k/v projections, split into heads),
captured with a forward pre-hook on that method, so they are what any method in its place would receive.
"""
from __future__ import annotations

import torch

from .data.shakespeare_char.prepare import encode
from .model import GPT


@torch.no_grad()
def capture_qkv(model: GPT, idx_or_text, layer: int, meta: dict | None = None):
    """q, k, v of ``layer`` (negative counts from the end) for token ids (T,) / (B, T) or a text (needs ``meta``
    with the vocabulary ``stoi``); each (B, H, T, D) on the model's device."""
    n_layer = model.config.n_layer
    if not -n_layer <= layer < n_layer:
        raise ValueError(f"capture_qkv: layer must be in [{-n_layer}, {n_layer}), got {layer}")
    device = model.token_emb.weight.device
    if isinstance(idx_or_text, str):
        if meta is None:
            raise ValueError("capture_qkv: a text needs meta (the vocabulary, from load_model) to be encoded")
        idx = torch.tensor([encode(idx_or_text, meta["stoi"])], dtype=torch.long)
    else:
        idx = torch.as_tensor(idx_or_text).long()
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
    captured = []
    attention = model.blocks[layer].attn.attention
    handle = attention.register_forward_pre_hook(lambda module, args: captured.append(args[:3]))
    was_training = model.training
    model.eval()
    try:
        model(idx.to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return captured[0]
