"""Real attention inputs: the queries, keys and values of a small GPT trained on tiny Shakespeare.

    x = shakespeare_qkv(4096)                  # QKV of shapes (1, H, 4096, D): last layer of the quick model
    x = shakespeare_qkv(1024, model="small")   # the small committed model: nothing is trained

The models' block is short (64 tokens), so consecutive blocks of the validation text are run through the model
and the q/k/v of one layer are joined along the sequence (``capture_qkv`` takes them at the input of the layer's
attention method, i.e. what any method in its place would receive).

Importing this module registers the input source ``shakespeare`` of ``common.data`` (the comparison finds it
there; ``common`` never imports this package): the quick model, or the small committed one when the comparison
asks for ``quick`` inputs.
"""
from __future__ import annotations

import math

import torch

from common.data import QKV, InputSpec, register_source

from .capture_qkv import capture_qkv
from .data_loader import load_split
from .quick_model import get_quick_model, get_small_model

MODELS = ("quick", "small")


def shakespeare_qkv(n: int, layer: int = -1, dtype=torch.float32, device="cpu", progress: bool = True,
                    model: str = "quick") -> QKV:
    """Real q/k/v (1, H, n, D) of ``layer`` of the ``model`` ('quick': trained on first use, 4 heads of 32;
    'small': committed, 2 heads of 32) on the first n validation tokens."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shakespeare_qkv: n must be a positive int, got {n!r}")
    if model not in MODELS:
        raise ValueError(f"shakespeare_qkv: model must be one of {MODELS}, got {model!r}")
    gpt, _ = get_quick_model(device="cpu", progress=progress) if model == "quick" else get_small_model("cpu")
    block = gpt.config.block_size
    n_blocks = math.ceil(n / block)
    val = torch.as_tensor(load_split("val")[: n_blocks * block].astype("int64"))
    if val.numel() < n_blocks * block:
        raise ValueError(f"shakespeare_qkv: the validation split has {val.numel()} tokens, fewer than n={n}")
    layer = layer % gpt.config.n_layer
    q, k, v = capture_qkv(gpt, val.view(n_blocks, block), layer)  # (n_blocks, H, block, D)
    join = lambda t: t.permute(1, 0, 2, 3).reshape(1, t.shape[1], n_blocks * block, t.shape[-1])[:, :, :n]
    return QKV(*(join(t).to(dtype=dtype, device=device) for t in (q, k, v)),
               source=f"nanoGPT {model} model, layer {layer}, {n_blocks} validation blocks of {block} tokens")


@register_source("shakespeare")
def shakespeare_source(n: int, spec: InputSpec) -> QKV:
    """The comparison's ``shakespeare`` input: the last layer of the quick model, of the small one if ``spec.quick``."""
    return shakespeare_qkv(n, dtype=spec.dtype, device=spec.device, progress=spec.progress,
                           model="small" if spec.quick else "quick")
