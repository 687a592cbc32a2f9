"""Train the GPT on character-level tiny Shakespeare with any registered attention method.

    python -m nanoGPT.train config/train_shakespeare_char_cpu.py                  # 2-core CPU size
    python -m nanoGPT.train config/train_shakespeare_char.py --attention=srf      # GPU size, another method
    python -m nanoGPT.train config/train_shakespeare_char_cpu.py --init_from=resume

Optimisation is AdamW (Loshchilov & Hutter 2019) with weight decay on matrices only, gradient clipping, and a
learning rate that warms up linearly and then follows a cosine down to ``min_lr`` (Loshchilov & Hutter 2017).
Every ``eval_interval`` iterations (and at the last) the train/val losses are estimated with
:func:`nanoGPT.evaluate.evaluate` and a checkpoint is written atomically to ``<out_dir>/ckpt.pt`` with the loss
curve ``<out_dir>/loss_curve.csv``. ``--init_from=resume`` continues from it and, with the same config, ends
bit-for-bit where an uninterrupted run ends: every random stream is saved and restored, and evaluation draws
from its own seeded generator so it never disturbs training's.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

import common

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, model_from_state, save_checkpoint
from .configurator import load_config
from .data_loader import get_batch, load_meta, load_split
from .evaluate import evaluate
from .model import GPT, GPTConfig

MODEL_KEYS = tuple(f.name for f in fields(GPTConfig))


@dataclass
class TrainConfig:
    """Training run of the GPT on tiny Shakespeare (chars)."""
    out_dir: str = "nanoGPT/out/shakespeare_char"
    init_from: str = "scratch"      # 'scratch' or 'resume' (from <out_dir>/ckpt.pt)
    overwrite: bool = False         # allow 'scratch' to replace an existing checkpoint in out_dir
    # model
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    attention: str = "exact"
    attention_options: dict = field(default_factory=dict)
    # optimisation
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0          # 0 disables clipping
    warmup_iters: int = 100
    lr_decay_iters: int = 0         # 0 = max_iters
    min_lr: float = 1e-4
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20
    eval_seed: int = 0
    progress: bool = True
    # system
    seed: int = 1337
    device: str = "cpu"             # 'cpu', 'cuda', 'cuda:1', or 'auto'
    dtype: str = "float32"          # 'float32' or 'bfloat16' (autocast; for GPUs)
    threads: int = 0                # torch.set_num_threads; 0 leaves torch's default

    def __post_init__(self):
        if self.init_from not in ("scratch", "resume"):
            raise ValueError(f"TrainConfig: init_from must be 'scratch' or 'resume', got {self.init_from!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("batch_size", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_iters < 0 or self.warmup_iters < 0 or self.lr_decay_iters < 0:
            raise ValueError("TrainConfig: max_iters, warmup_iters and lr_decay_iters must be >= 0")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, **{k: getattr(self, k) for k in MODEL_KEYS if k != "vocab_size"})


def learning_rate(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate over warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and embeddings only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def resolve_device(name: str) -> torch.device:
    """The torch device of ``name``; 'cuda' gets its index ('cuda:0'), the key under which attention methods
    keep their per-device generators (they see q.device), so that their random states are saved and restored."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig: device={name!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_trainable(name: str) -> None:
    """A GPT trains with causal attention and gradients; refuse methods that cannot do both, saying why."""
    cls = common.method_class(name)
    if not cls.supports_causal:
        raise ValueError(f"attention {name!r} cannot train a GPT: it does not support causal=True")
    if not cls.trainable:
        raise ValueError(f"attention {name!r} cannot train a GPT: it is inference-only (trainable=False, no "
                         "gradient); train with another method and swap it in with nanoGPT.evaluate")


def attention_options_for(cfg: TrainConfig) -> dict:
    """The run's attention options; a randomised method without a seed gets the run's, so runs repeat."""
    options = dict(cfg.attention_options)
    if common.method_class(cfg.attention).randomized and options.get("seed") is None:
        options["seed"] = cfg.seed
    return options


def rng_state(model: GPT, batch_generator: torch.Generator, device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "batches": batch_generator.get_state(),
            "attention": [b.attn.attention.generator(device).get_state() if b.attn.attention.randomized else None
                          for b in model.blocks]}


def set_rng_state(state: dict, model: GPT, batch_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    batch_generator.set_state(state["batches"].cpu())
    for block, attn_state in zip(model.blocks, state["attention"]):
        if attn_state is not None:
            block.attn.attention.generator(device).set_state(attn_state.cpu())


def check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """The checkpoint must be of the same model and data order as the config asks for."""
    saved_cfg = saved["config"]
    keys = [k for k in MODEL_KEYS if k != "vocab_size"] + ["batch_size", "seed"]
    diffs = [f"{k}: checkpoint {saved_cfg.get(k)!r} vs config {getattr(cfg, k)!r}" for k in keys
             if saved_cfg.get(k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different config; resume needs the same "
                              "model, batch size and seed:\n  " + "\n  ".join(diffs))


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {'out_dir', 'iter_num', 'history', 'val_loss', 'train_loss'}."""
    check_trainable(cfg.attention)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    path = checkpoint_path(out_dir)
    meta = load_meta()
    train_data, amp_dtype = load_split("train"), (torch.bfloat16 if cfg.dtype == "bfloat16" else None)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    batch_generator = torch.Generator()

    if cfg.init_from == "resume":
        saved = load_checkpoint(out_dir, device)
        check_resumable(saved, cfg, path)
        model = model_from_state(saved, path).to(device)
        optimizer = make_optimizer(model, cfg, device)
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], model, batch_generator, device)
        iter_num, best_val, history = saved["iter_num"], saved["best_val_loss"], saved["history"]
    else:
        if path.exists() and not cfg.overwrite:
            raise FileExistsError(f"{path} exists; continue it with --init_from=resume, or pass --overwrite=True "
                                  "(or another --out_dir) to start over")
        torch.manual_seed(cfg.seed)
        batch_generator.manual_seed(cfg.seed)
        model_config = cfg.model_config(meta["vocab_size"])
        model_config.attention_options = attention_options_for(cfg)
        model = GPT(model_config).to(device)
        optimizer = make_optimizer(model, cfg, device)
        iter_num, best_val, history = 0, math.inf, []

    def estimate() -> dict:
        return {split: evaluate(model, split, cfg.batch_size, cfg.eval_iters, cfg.eval_seed, amp_dtype)["loss"]
                for split in ("train", "val")}

    def checkpoint() -> None:
        save_checkpoint(out_dir, {
            "model": model.state_dict(), "model_config": model.config.to_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(model, batch_generator, device), "iter_num": iter_num, "best_val_loss": best_val,
            "history": history, "config": asdict(cfg), "meta": meta})

    if iter_num == 0 and not history:
        losses = estimate()
        history.append({"iter": 0, "eval_train_loss": losses["train"], "eval_val_loss": losses["val"]})
    tokens_per_iter = cfg.batch_size * cfg.block_size
    bar = tqdm(total=cfg.max_iters, initial=iter_num, desc=f"train {cfg.attention}", disable=not cfg.progress,
               dynamic_ncols=True)
    model.train()
    tokens_per_s = 0.0
    while iter_num < cfg.max_iters:
        t0 = time.perf_counter()
        lr = learning_rate(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(train_data, cfg.batch_size, cfg.block_size, batch_generator, device)
        with autocast:
            _, loss = model(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at iter {iter_num}; "
                                     f"no checkpoint written for this run after iter {iter_num}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        iter_num += 1
        row = {"iter": iter_num, "lr": lr, "train_loss": loss.item()}
        tokens_per_s = 0.9 * tokens_per_s + 0.1 * tokens_per_iter / (time.perf_counter() - t0) if tokens_per_s \
            else tokens_per_iter / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            losses = estimate()
            row.update(eval_train_loss=losses["train"], eval_val_loss=losses["val"])
            best_val = min(best_val, losses["val"])
            bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        history.append(row)
        if "eval_val_loss" in row:
            checkpoint()
    bar.close()
    evals = [r for r in history if "eval_val_loss" in r]
    return {"out_dir": str(out_dir), "iter_num": iter_num, "history": history,
            "val_loss": evals[-1]["eval_val_loss"], "train_loss": evals[-1]["eval_train_loss"]}


def main(argv=None) -> dict:
    cfg = load_config(TrainConfig, sys.argv[1:] if argv is None else argv)
    return train(cfg)


if __name__ == "__main__":
    main()
