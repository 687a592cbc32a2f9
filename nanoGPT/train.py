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
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, model_from_state, save_checkpoint
from .configurator import ConfigError, load_config
from .data_loader import get_batch, load_meta, load_split
from .evaluate import evaluate
from .model import GPT, GPTConfig, ModelConfig, check_attention

QUICK = ["config/train_tiny.py", "--overwrite=True"]  # what --quick stands for: the tiny model, 50 steps
MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))


@dataclass
class TrainConfig(ModelConfig):
    """Training run of the GPT on tiny Shakespeare (chars). The model keys (block_size, n_layer, n_head,
    n_embd, dropout, bias, attention, attention_options) and their defaults are ModelConfig's (nanoGPT.model)."""
    out_dir: str = "nanoGPT/out/shakespeare_char"
    init_from: str = "scratch"      # 'scratch' or 'resume' (from <out_dir>/ckpt.pt)
    overwrite: bool = False         # allow 'scratch' to replace an existing checkpoint in out_dir
    # optimisation
    batch_size: int = 12            # sequences per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per step, split across the processes of a torchrun
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
        super().__post_init__()
        if self.init_from not in ("scratch", "resume"):
            raise ValueError(f"TrainConfig: init_from must be 'scratch' or 'resume', got {self.init_from!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_iters < 0 or self.warmup_iters < 0 or self.lr_decay_iters < 0:
            raise ValueError("TrainConfig: max_iters, warmup_iters and lr_decay_iters must be >= 0")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPT this run trains: its model fields, the data's vocabulary, and the attention options seeded
        with the run's seed when the method is randomised (so that runs repeat exactly)."""
        options = common.method_options(self.attention, self.attention_options, self.seed)
        return GPTConfig(**{**self.model_fields(), "attention_options": options}, vocab_size=vocab_size)


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


@dataclass(frozen=True)
class Ranks:
    """The processes of a run: one (rank 0 of 1), or those ``torchrun`` started (its RANK, WORLD_SIZE and
    LOCAL_RANK), joined in a torch.distributed process group, NCCL on GPUs and gloo on CPUs, as upstream nanoGPT
    does. Each process runs its share of every step's micro-batches through DistributedDataParallel, which
    averages the gradients; only rank 0 evaluates, writes checkpoints and logs. Outside a torchrun every method
    below is the single-process no-op."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, gradient_accumulation_steps: int) -> "Ranks":
        if "RANK" not in os.environ:
            return cls()
        ranks = cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
        if gradient_accumulation_steps % ranks.world_size:
            raise ValueError(f"TrainConfig: gradient_accumulation_steps={gradient_accumulation_steps} must be a "
                             f"multiple of the {ranks.world_size} processes (each runs an equal share of a step)")
        return ranks

    def join(self, device: torch.device) -> None:
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=self.rank,
                                    world_size=self.world_size)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model: nn.Module, last: bool):
        """No gradient all-reduce for this backward unless it is the step's last micro-batch."""
        return model.no_sync() if self.distributed and not last else contextlib.nullcontext()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def any_signal(self, signum: int | None, device: torch.device) -> int | None:
        """The signal any process received (they all stop after the same step), or None."""
        if not self.distributed:
            return signum
        flag = torch.tensor(signum or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, ranks: Ranks = Ranks()) -> torch.device:
    """The torch device of ``name``; 'cuda' gets its index ('cuda:0'; under torchrun the process's LOCAL_RANK),
    the key under which attention methods keep their per-device generators (they see q.device), so that their
    random states are saved and restored. Joins the process group of a torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig: device={name!r} but CUDA is not available")
        if ranks.distributed:
            device = torch.device("cuda", ranks.local_rank)
            torch.cuda.set_device(device)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    ranks.join(device)
    return device


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
    keys = [*MODEL_KEYS, "batch_size", "gradient_accumulation_steps", "seed"]
    # checkpoints written before these keys existed
    defaults = {"gradient_accumulation_steps": 1, "position_embedding": "learned", "layer_attention": None}
    diffs = [f"{k}: checkpoint {saved_cfg.get(k, defaults.get(k))!r} vs config {getattr(cfg, k)!r}" for k in keys
             if saved_cfg.get(k, defaults.get(k)) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with a different config; resume needs the same "
                              "model, batch size, gradient accumulation and seed:\n  " + "\n  ".join(diffs))


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after writing a checkpoint that ``--init_from=resume`` continues
    bit for bit. A KeyboardInterrupt, so that callers stop as they would on Ctrl-C."""

    def __init__(self, signum: int, iter_num: int, path: Path):
        super().__init__(f"{signal.Signals(signum).name} at iter {iter_num}; checkpoint saved to {path}")
        self.signum, self.iter_num, self.path = signum, iter_num, path


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, SIGINT and SIGTERM do not kill the process: the first one sets ``request['signum']``,
    which the training loop checks after each iteration; the same signal again raises KeyboardInterrupt at once
    (the checkpoint on disk stays intact: writes are atomic). Handlers can only be set from the main thread;
    elsewhere the signals keep their usual effect."""
    request = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request["signum"] == signum:
            raise KeyboardInterrupt
        if request["signum"] is not None:
            return  # another kind (torchrun answers Ctrl-C with SIGTERM to its workers): still saving
        request["signum"] = signum
        tqdm.write(f"nanoGPT.train: {signal.Signals(signum).name}: saving a checkpoint after this iteration "
                   "(send it again to stop at once, without saving)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield request
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {'out_dir', 'iter_num', 'history', 'val_loss', 'train_loss'}.

    A checkpoint is written after the first evaluation (iteration 0), after every evaluation, and when SIGINT or
    SIGTERM arrives (after the iteration in progress); the latter then raises :class:`TrainingInterrupted`."""
    with stop_on_signals() as stop:
        try:
            return _train(cfg, stop)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, stop: dict) -> dict:
    check_attention(cfg.attention, trainable=True)
    ranks = Ranks.from_environment(cfg.gradient_accumulation_steps)
    device = resolve_device(cfg.device, ranks)
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
        model = GPT(cfg.model_config(meta["vocab_size"])).to(device)
        optimizer = make_optimizer(model, cfg, device)
        iter_num, best_val, history = 0, math.inf, []
    stepped = ranks.wrap(model, device)  # the model the steps run through (DDP across processes)

    def estimate() -> dict:
        return {split: evaluate(model, split, cfg.batch_size, cfg.eval_iters, cfg.eval_seed, amp_dtype)["loss"]
                for split in ("train", "val")}

    saved_at = None  # the iteration of the last checkpoint written by this process

    def checkpoint() -> None:
        nonlocal saved_at
        if ranks.master:
            save_checkpoint(out_dir, {
                "model": model.state_dict(), "model_config": model.config.to_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng_state(model, batch_generator, device),
                "iter_num": iter_num, "best_val_loss": best_val, "history": history, "config": asdict(cfg),
                "meta": meta})
        saved_at = iter_num

    def stop_if_asked() -> None:
        signum = ranks.any_signal(stop["signum"], device)
        if signum is None:
            return
        if saved_at != iter_num:
            checkpoint()
        ranks.barrier()  # every process waits for the checkpoint before stopping
        if ranks.master:
            tqdm.write(f"nanoGPT.train: {signal.Signals(signum).name} at iter {iter_num}: saved a checkpoint to "
                       f"{path}; continue with --init_from=resume", file=sys.stderr)
        raise TrainingInterrupted(signum, iter_num, path)

    if iter_num == 0 and not history:
        if ranks.master:
            losses = estimate()
            history.append({"iter": 0, "eval_train_loss": losses["train"], "eval_val_loss": losses["val"]})
        checkpoint()  # a run is resumable from its first iteration on, even one killed without a signal
    micro_batches = cfg.gradient_accumulation_steps // ranks.world_size  # this process's share of each step
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    model.train()
    tokens_per_s = 0.0
    with tqdm(total=cfg.max_iters, initial=iter_num, desc=f"train {cfg.attention}",
              disable=not (cfg.progress and ranks.master), dynamic_ncols=True) as bar:
        stop_if_asked()
        while iter_num < cfg.max_iters:
            t0 = time.perf_counter()
            lr = learning_rate(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Every process draws the step's gradient_accumulation_steps micro-batches (the same ones: one seeded
            # generator) and runs its own share, so that the step sees the batch a single process would.
            batches = [get_batch(train_data, cfg.batch_size, cfg.block_size, batch_generator, device)
                       for _ in range(cfg.gradient_accumulation_steps)]
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for i, (x, y) in enumerate(batches[ranks.rank * micro_batches:(ranks.rank + 1) * micro_batches]):
                # DDP averages the gradients over processes when the last micro-batch's backward runs.
                with ranks.no_sync(stepped, last=i == micro_batches - 1), autocast:
                    _, loss = stepped(x, y)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()} at iter {iter_num}; "
                                                 f"no checkpoint written for this run after iter {iter_num}")
                    (loss / micro_batches).backward()
                step_loss += loss.detach().float() / cfg.gradient_accumulation_steps
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            iter_num += 1
            row = {"iter": iter_num, "lr": lr, "train_loss": ranks.sum(step_loss).item()}
            tokens_per_s = 0.9 * tokens_per_s + 0.1 * tokens_per_iter / (time.perf_counter() - t0) if tokens_per_s \
                else tokens_per_iter / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            if ranks.master and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
                losses = estimate()
                row.update(eval_train_loss=losses["train"], eval_val_loss=losses["val"])
                best_val = min(best_val, losses["val"])
                bar.write(f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            history.append(row)
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                checkpoint()
            stop_if_asked()
    evals = [r for r in history if "eval_val_loss" in r]
    return {"out_dir": str(out_dir), "iter_num": iter_num, "history": history,
            "val_loss": evals[-1]["eval_val_loss"] if evals else None,
            "train_loss": evals[-1]["eval_train_loss"] if evals else None}


def main(argv=None) -> dict:
    """The command line: exits with a message (no traceback) on a config or checkpoint error, and with status
    128 + the signal's number after an interrupt has saved a checkpoint."""
    try:
        cfg = load_config(TrainConfig, sys.argv[1:] if argv is None else argv, quick=QUICK)
        return train(cfg)
    except TrainingInterrupted as stopped:
        raise SystemExit(128 + stopped.signum) from None
    except KeyboardInterrupt:
        print("nanoGPT.train: aborted; the last checkpoint written, if any, is intact", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except (CheckpointError, FileExistsError, FileNotFoundError, ConfigError) as err:
        raise SystemExit(f"nanoGPT.train: {err}") from None


if __name__ == "__main__":
    main()
