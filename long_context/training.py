"""Training the long-context models (issue 14), with exact attention or with a trainable method itself (kNN
attention and SRF were trained with their approximation in their papers: ``attention`` / ``attention_options``).

- :func:`train_recall`: a GPT without position embeddings (NoPE) on multi-query associative recall
  (:mod:`long_context.recall`), the loss the cross-entropy at the query positions only; each step draws its
  sequence length from ``lengths``, so the model sees several context lengths and runs at any other.
- :func:`train_lm`: the character-level language model on tiny Shakespeare with a long block (learned positions),
  trained by ``nanoGPT.train`` (single process or torchrun), then written as a small long-context checkpoint.

Both use AdamW with linear warm-up and cosine decay (``nanoGPT.train.learning_rate``) and, on a GPU, bfloat16
autocast. The method a model was trained with is recorded in its config (``attention``, ``attention_options``,
seeded) and in its manifest (``trained_attention``); :func:`attention_options` resolves a budget label to options.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from common.gpu_benchmark import chosen_budgets
from nanoGPT.model import GPT, GPTConfig, check_attention
from nanoGPT.train import TrainConfig, learning_rate, make_optimizer
from nanoGPT.train import train as nanogpt_train
from nanoGPT.checkpoint import load_model as load_nanogpt_model

from .checkpoints import provenance, save_model
from .recall import IGNORE_INDEX, RecallTask, recall_accuracy, recall_batch

AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def autocast_context(device: torch.device, dtype: str):
    """bfloat16 autocast for ``dtype='bfloat16'``, nothing for float32."""
    if dtype not in AMP_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(AMP_DTYPES)}, got {dtype!r}")
    amp = AMP_DTYPES[dtype]
    return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def attention_options(name: str, options: dict | None = None, budget: str | None = None, n: int | None = None,
                      seed: int = 0) -> dict:
    """The options a model is trained with: ``name``'s declared budget ``budget`` ('low', 'mid', 'high':
    ``common.gpu_benchmark.chosen_budgets`` at ``n`` keys) updated by the explicit ``options``, seeded
    (``common.method_options``). A name that cannot train a GPT (unknown, not causal, no gradient) raises a
    ValueError naming it."""
    check_attention(name, trainable=True)
    resolved = {}
    if budget is not None:
        if name == "exact":
            raise ValueError("attention_options: 'exact' has no budgets; give --attention-budget only with a method")
        if n is None:
            raise ValueError("attention_options: a budget needs n, the number of keys it is declared for")
        (_, resolved), = chosen_budgets(name, n, seed, budget)
    resolved.update(options or {})
    return common.method_options(name, resolved, seed)


def add_attention_arguments(parser, budget_at: str) -> None:
    """The training scripts' ``--attention``, ``--attention-options`` and ``--attention-budget`` (declared at
    ``budget_at``, e.g. 'the block size'); read back by :func:`attention_from_args`."""
    parser.add_argument("--attention", default="exact", help="the method trained with (any trainable causal one)")
    parser.add_argument("--attention-options", default="{}", metavar="JSON",
                        help="its options, a JSON object (updates --attention-budget's), e.g. '{\"k\": 32}'")
    parser.add_argument("--attention-budget", choices=("low", "mid", "high"),
                        help=f"start from the method's declared budget at {budget_at}")


def attention_from_args(args, n: int, script: str) -> dict:
    """The options :func:`attention_options` resolves from a training script's arguments (budget at ``n``
    keys); a malformed ``--attention-options`` exits naming ``script``."""
    try:
        options = json.loads(args.attention_options)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{script}: --attention-options must be a JSON object ({err})") from None
    if not isinstance(options, dict):
        raise SystemExit(f"{script}: --attention-options must be a JSON object, got {options!r}")
    return attention_options(args.attention, options, args.attention_budget, n, args.seed)


def recall_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats, float32) over the scored positions of a recall batch."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass
class RecallTrainConfig:
    """A recall training run: the task, the model, the optimisation, the system."""
    # task (RecallTask's counts and vocabularies; each step draws its length from ``lengths``)
    lengths: tuple = (32,)
    pairs: int = 8
    queries: int = 8
    # A curriculum over the keys: stage i (``curriculum_iters`` steps each) draws the keys from the first K_i
    # keys only, K_i = key_curriculum[i] (pairs = min(pairs, K_i)), then the full task. Without it the model sits
    # at chance for hundreds of steps (the key matching and the value read-out of 256 one-token pairs must form
    # together); with 4 keys the retrieval circuit forms within tens of steps, and later keys then only need
    # their embeddings (2 layers, d = 64: > 99% at n = 32 after ~550 steps on the CPU).
    key_curriculum: tuple = (4, 8, 12, 16, 24)
    curriculum_iters: int = 100
    n_keys: int = 32
    n_values: int = 8
    n_distractors: int = 16
    # model (a GPT without position embeddings)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    # the attention the model trains with (a fine-tune switches its checkpoint's model to it)
    attention: str = "exact"
    attention_options: dict = field(default_factory=dict)
    # optimisation
    batch_size: int = 64
    max_iters: int = 800
    learning_rate: float = 3e-3
    min_lr: float = 1e-4
    warmup_iters: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 4
    time_limit: float = 0.0         # seconds; > 0: stop after the step that passes it (then evaluate and return)
    # system
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        check_attention(self.attention, trainable=True)
        self.attention_options = common.method_options(self.attention, self.attention_options, self.seed)

    def task(self, n: int | None = None) -> RecallTask:
        return RecallTask(n or max(self.lengths), self.pairs, self.queries, self.n_keys, self.n_values,
                          self.n_distractors)

    def model_config(self) -> GPTConfig:
        return GPTConfig(block_size=max(self.lengths), n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=0.0, bias=True, attention=self.attention,
                         attention_options=dict(self.attention_options), position_embedding="none", vocab_size=self.task().vocab_size)

    def train_config(self) -> TrainConfig:
        """The nanoGPT training config whose optimiser and schedule this run uses."""
        return TrainConfig(learning_rate=self.learning_rate, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                           max_iters=self.max_iters, weight_decay=self.weight_decay, grad_clip=self.grad_clip)


@torch.no_grad()
def recall_metric(model: GPT, task: RecallTask, batches: int, batch_size: int, seed: int,
                  dtype: str = "float32") -> dict:
    """{'accuracy', 'loss'} of ``model`` on ``batches`` seeded batches of ``task`` (the same batches for every
    attention swapped in, so that methods are compared on the same sequences)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    loss_sum = 0.0
    for _ in range(batches):
        tokens, targets = recall_batch(task, batch_size, generator, device)
        with autocast_context(device, dtype):
            logits, _ = model(tokens)
        scored = int((targets != IGNORE_INDEX).sum())
        correct += recall_accuracy(logits, targets).item() * scored
        loss_sum += recall_loss(logits, targets).item() * scored
        total += scored
    return {"accuracy": correct / total, "loss": loss_sum / total}


def reseed_attention(model: GPT) -> None:
    """Restart every layer's random stream from its seed (a randomised method's evaluation then draws what a
    freshly loaded checkpoint draws, so the recorded metric is reproducible)."""
    for block in model.blocks:
        block.attn.attention.reseed(block.attn.attention.seed)


def train_recall(cfg: RecallTrainConfig, model: GPT | None = None, progress: bool = True,
                 on_evaluation=None) -> tuple[GPT, list[dict]]:
    """Train (or fine-tune ``model``, switched to ``cfg.attention``) on recall; returns the model in eval mode and
    the history (one row per evaluation: iter, n, accuracy and loss at each training length, on held-out seeded
    batches, with the training attention, its random streams restarted from their seeds first).
    ``on_evaluation(model, history)`` runs after each evaluation (e.g. to write a checkpoint, so that a run killed
    from outside leaves its last one)."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if model is None:
        model = GPT(cfg.model_config())
    elif (model.config.attention, model.config.attention_options, model.config.layer_attention) != \
            (cfg.attention, cfg.attention_options, None):
        model.set_attention(cfg.attention, **cfg.attention_options)
    model = model.to(device).train()
    optimizer = make_optimizer(model, cfg.train_config(), device)
    generator = torch.Generator().manual_seed(cfg.seed)
    tasks = [cfg.task(n) for n in cfg.lengths]
    history, t0 = [], time.perf_counter()

    def evaluate(it: int) -> None:
        model.eval()
        row = {"iter": it, "seconds": round(time.perf_counter() - t0, 1)}
        for task in tasks:
            reseed_attention(model)
            m = recall_metric(model, task, cfg.eval_batches, cfg.batch_size, seed=10_000 + cfg.seed, dtype=cfg.dtype)
            row[f"accuracy_n{task.n}"], row[f"loss_n{task.n}"] = m["accuracy"], m["loss"]
        history.append(row)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if on_evaluation is not None:
            on_evaluation(model, history)
        model.train()

    train_cfg = cfg.train_config()
    it = 0
    for it in tqdm(range(cfg.max_iters), desc="train recall", disable=not progress, dynamic_ncols=True):
        if it % cfg.eval_interval == 0:
            evaluate(it)
        if cfg.time_limit and time.perf_counter() - t0 > cfg.time_limit:
            tqdm.write(f"train_recall: time limit of {cfg.time_limit:g} s reached at iter {it}")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, train_cfg)
        task = tasks[int(torch.randint(len(tasks), (), generator=generator))]
        stage = it // cfg.curriculum_iters
        active = cfg.key_curriculum[stage] if stage < len(cfg.key_curriculum) else None
        if active is not None and task.pairs > active:
            task = dataclasses.replace(task, pairs=active, queries=min(task.queries, active))
        tokens, targets = recall_batch(task, cfg.batch_size, generator, device, active_keys=active)
        with autocast_context(device, cfg.dtype):
            logits, _ = model(tokens)
        loss = recall_loss(logits, targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"train_recall: loss became {loss.item()} at iter {it}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        it += 1
    evaluate(it)
    return model.eval(), history


def save_recall(path, model: GPT, cfg: RecallTrainConfig, history: list[dict], command: str,
                parent: dict | None = None, half: bool = True) -> Path:
    """The trained recall model as a long-context checkpoint, its manifest naming the command, the attention it
    was trained with and the result; ``parent``: the manifest of the checkpoint this run fine-tuned (kept in the
    new one as ``fine_tuned_from``); ``half``: weights stored in float16."""
    manifest = {"command": command, "data": "recall sequences generated on the fly (long_context.recall, seeded)",
                "trained_attention": {"name": cfg.attention, "options": dict(cfg.attention_options)},
                "train_config": dataclasses.asdict(cfg), "final": history[-1], **provenance()}
    if parent is not None:
        manifest["fine_tuned_from"] = parent
    return save_model(path, model, "recall", task=cfg.task(), manifest=manifest, half=half)


LM_DEFAULTS = dict(block_size=4096, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False, batch_size=8,
                   max_iters=2000, learning_rate=2e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250,
                   eval_iters=10, weight_decay=0.1)


def fit_max_iters(cfg: TrainConfig, seconds: float, probe: tuple = (2, 5, 25)) -> dict:
    """How many steps of ``cfg``'s training fit in ``seconds``: short runs of the same model, batch and attention
    in a scratch folder (removed after), ``probe`` steps each: the first warms up (CUDA context, kernel choice),
    the last two give the seconds per step by their difference (their evaluation, checkpoints and start-up
    cancel; if the difference is not positive, the last run's seconds per step, an overestimate). The answer is
    at most ``cfg.max_iters``, at least probe[-1]. Returns {'max_iters', 'seconds_per_step', 'probe_seconds'}."""
    start = time.perf_counter()
    scratch = Path(cfg.out_dir).with_name(Path(cfg.out_dir).name + "_probe")
    spent = []
    for steps in probe:
        run = dataclasses.replace(cfg, max_iters=steps, eval_interval=steps, eval_iters=1, warmup_iters=0,
                                  out_dir=str(scratch), init_from="scratch", overwrite=True, progress=False)
        t0 = time.perf_counter()
        nanogpt_train(run)
        spent.append(time.perf_counter() - t0)
    shutil.rmtree(scratch, ignore_errors=True)
    per_step = (spent[-1] - spent[-2]) / (probe[-1] - probe[-2])
    if per_step <= 0:
        per_step = spent[-1] / probe[-1]
    fitted = int(min(cfg.max_iters, max(probe[-1], seconds / per_step)))
    return {"max_iters": fitted, "seconds_per_step": per_step, "probe_seconds": time.perf_counter() - start}


def train_lm(train_cfg: TrainConfig, out_path, command: str, fit_time: float = 0.0) -> GPT:
    """Train the character-level LM with ``nanoGPT.train`` (checkpoints in ``train_cfg.out_dir``, resumable) and
    write the trained model as a long-context checkpoint at ``out_path``; returns the model. ``fit_time`` > 0:
    first lower ``max_iters`` to the steps that fit that many seconds (:func:`fit_max_iters`), so that the
    learning-rate schedule runs to its end within a time limit."""
    fitted = None
    if fit_time > 0:
        fitted = fit_max_iters(train_cfg, fit_time)
        tqdm.write(f"train_lm: {fitted['seconds_per_step'] * 1e3:.1f} ms per step: max_iters "
                   f"{train_cfg.max_iters} -> {fitted['max_iters']} to fit {fit_time:g} s")
        train_cfg = dataclasses.replace(train_cfg, max_iters=fitted["max_iters"])
    nanogpt_train(train_cfg)
    return export_lm(train_cfg.out_dir, out_path, command,
                     extra=None if fitted is None else {"fit_time": {"seconds": fit_time, **fitted}})


def export_lm(work_dir, out_path, command: str, extra: dict | None = None) -> GPT:
    """The model of nanoGPT's checkpoint in ``work_dir`` (finished or stopped early) as a long-context checkpoint
    at ``out_path``, its manifest naming the command, the data, the iterations run and the last losses (and the
    ``extra`` entries)."""
    model, meta = load_nanogpt_model(work_dir)
    evals = [r for r in meta["history"] if "eval_val_loss" in r]
    manifest = {"command": command, "data": "tiny Shakespeare, nanoGPT/data/shakespeare_char (train split; "
                "validation loss on the val split)",
                "trained_attention": {"name": model.config.attention, "options": dict(model.config.attention_options)},
                "train_config": meta["config"],
                "final": {"iter": meta["iter_num"], "val_loss": evals[-1]["eval_val_loss"] if evals else None,
                          "train_loss": evals[-1]["eval_train_loss"] if evals else None,
                          "losses_at_iter": evals[-1]["iter"] if evals else None}, **(extra or {}), **provenance()}
    vocab = {"vocab_size": meta["vocab_size"], "stoi": meta["stoi"], "itos": meta["itos"]}
    save_model(out_path, model, "lm", meta=vocab, manifest=manifest)
    return model
