"""Generate text from a trained checkpoint.

    python -m nanoGPT.sample --out_dir=nanoGPT/out/quick_exact --start="ROMEO:" --max_new_tokens=300
    python -m nanoGPT.sample --out_dir=... --attention=srf          # decode with another method's state
    python -m nanoGPT.sample --out_dir=... --use_cache=False        # re-run the whole window per token
    python -m nanoGPT.sample --quick             # the model of `python -m nanoGPT.train --quick`, 100 characters

Decoding keeps each layer's decoding state (``attention.init_state()`` / ``attention.step``): a KV cache for
``exact`` and the sampling methods, the method's own constant-size state where it has one (SRF). A randomised
method swapped in without a ``seed`` option gets ``--seed`` (``common.method_options``).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

import common

from .checkpoint import CheckpointError, load_model
from .configurator import TINY_CONFIG, ConfigError, load_config, read_config_file
from .data.shakespeare_char.prepare import decode, encode


@dataclass
class SampleConfig:
    """Sample text from a checkpoint."""
    out_dir: str = "nanoGPT/out/quick_exact"
    start: str = "\n"                   # the prompt; "FILE:path" reads it from a file
    num_samples: int = 2
    max_new_tokens: int = 300
    temperature: float = 0.8
    top_k: int = 0                      # 0 = no top-k truncation
    use_cache: bool = True
    attention: str = ""                 # '' = the method the model was trained with
    attention_options: dict = field(default_factory=dict)
    seed: int = 1337                    # seeds the sampling, and a swapped-in randomised method without a seed
    device: str = "cpu"


# What --quick stands for: the model of `python -m nanoGPT.train --quick`, one short sample.
QUICK = [f"--out_dir={read_config_file(TINY_CONFIG)['out_dir']}", "--num_samples=1", "--max_new_tokens=100"]


def sample(cfg: SampleConfig) -> list[str]:
    """The generated texts (prompt included)."""
    options = common.method_options(cfg.attention, cfg.attention_options, cfg.seed) if cfg.attention else None
    model, meta = load_model(cfg.out_dir, cfg.attention or None, options, device=cfg.device)
    prompt = open(cfg.start[5:], encoding="utf-8").read() if cfg.start.startswith("FILE:") else cfg.start
    if not prompt:
        raise ValueError("sample: start must be a non-empty prompt")
    idx = torch.tensor([encode(prompt, meta["stoi"])] * cfg.num_samples, dtype=torch.long, device=cfg.device)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    out = model.generate(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None, cfg.use_cache, generator)
    return [decode(row.tolist(), meta["itos"]) for row in out]


def main(argv=None) -> list[str]:
    try:
        cfg = load_config(SampleConfig, sys.argv[1:] if argv is None else argv, quick=QUICK)
        t0 = time.perf_counter()
        texts = sample(cfg)
    except (CheckpointError, FileNotFoundError, ConfigError) as err:
        raise SystemExit(f"nanoGPT.sample: {err}") from None
    elapsed = time.perf_counter() - t0
    for text in texts:
        print(text)
        print("-" * 40)
    print(f"{cfg.num_samples} x {cfg.max_new_tokens} tokens in {elapsed:.2f} s "
          f"(use_cache={cfg.use_cache}, device {cfg.device})", file=sys.stderr)
    return texts


if __name__ == "__main__":
    main()
