"""Real long-range attention inputs for ``common.compare``: the per-layer q/k/v of the committed long-context models.

    python -m common.compare --inputs recall lm --n 1024 4096

- ``recall``: the NoPE recall model fine-tuned at n up to 16,384 (``checkpoints/recall_long.pth``) run on one
  seeded recall sequence of length n (any n: the model has no position table); the queries at the end must find
  a pair far back.
- ``lm``: the character LM (``checkpoints/lm_exact.pth``, block 4096) run on the first n characters of the
  validation text (n <= its block size; a longer n is a ValueError naming the limit).

Each gives the inputs of one layer's attention method (``nanoGPT.capture_qkv``: what any method in its place
receives), by default the FIRST layer (layer 0): the layer sweeps of ``long_context.evaluate`` show it is the one
whose attention the models' quality depends on (the recall model keeps 100% with any method in its last layer and
falls to chance with almost any method in its first; the LM's perplexity rises most from layer 0). The heads are
the model's. The model runs on the requested device (``InputSpec.device``; loaded once per device) in float32 and
the q/k/v are then cast to the requested dtype, so a comparison at n = 65,536 on a GPU captures there.
Importing this module registers both sources with ``common.data.register_source`` (``common`` finds it by its file
name and never imports this package); they are not in a comparison's default inputs (``in_default=False``), since
their checkpoints may be absent in a fresh clone of a fork, and ``--inputs recall lm`` asks for them.
"""
from __future__ import annotations

import torch

from common.data import QKV, InputSpec, register_source
from nanoGPT.capture_qkv import capture_qkv
from nanoGPT.data_loader import load_split

from .checkpoints import DEFAULT_CHECKPOINTS, load_model
from .recall import recall_batch

_MODELS: dict = {}


def _model(kind: str, path=None, device="cpu"):
    """The long-context model of ``kind`` in float32 on ``device`` (loaded once per path and device)."""
    path = DEFAULT_CHECKPOINTS[kind] if path is None else path
    key = (kind, str(path), str(torch.device(device)))
    if key not in _MODELS:
        _MODELS[key] = load_model(path, kind, device)
    return _MODELS[key]


def long_context_qkv(kind: str, n: int, layer: int = 0, seed: int = 0, dtype=torch.float32, device="cpu",
                     path=None) -> QKV:
    """q, k, v (1, H, n, D) of ``layer`` (negative counts from the end) of the ``kind`` model ('recall' or 'lm')
    at length n: a recall sequence drawn with ``seed``, or the first n validation characters."""
    if kind not in DEFAULT_CHECKPOINTS:
        raise ValueError(f"long_context_qkv: kind must be one of {tuple(DEFAULT_CHECKPOINTS)}, got {kind!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{kind}: n must be a positive int, got {n!r}")
    model, info = _model(kind, path, device)
    if kind == "recall":
        task = info["task"]
        if n < task.pairs + 2 * task.queries:
            raise ValueError(f"recall: n={n} is too short for the model's task (needs >= "
                             f"{task.pairs + 2 * task.queries})")
        tokens, _ = recall_batch(task.with_length(n), 1, torch.Generator().manual_seed(seed))
        source = f"recall model, layer {layer % model.config.n_layer}, one recall sequence (seed {seed})"
    else:
        if n > model.config.block_size:
            raise ValueError(f"lm: n={n} exceeds the LM's block_size={model.config.block_size}")
        tokens = torch.as_tensor(load_split("val")[:n].astype("int64")).unsqueeze(0)
        source = f"long-context LM, layer {layer % model.config.n_layer}, first {n} validation characters"
    q, k, v = capture_qkv(model, tokens, layer)
    return QKV(*(t.to(dtype=dtype, device=device) for t in (q, k, v)), source=source)


@register_source("recall", in_default=False)
def recall_source(n: int, spec: InputSpec) -> QKV:
    """The comparison's ``recall`` input: the recall model's first layer on one sequence seeded by ``spec.seed``."""
    return long_context_qkv("recall", n, seed=spec.seed, dtype=spec.dtype, device=spec.device)


@register_source("lm", in_default=False)
def lm_source(n: int, spec: InputSpec) -> QKV:
    """The comparison's ``lm`` input: the long-context LM's first layer on the first n validation characters."""
    return long_context_qkv("lm", n, dtype=spec.dtype, device=spec.device)
