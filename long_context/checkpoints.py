"""The long-context models' checkpoint files: the weights, the model config, what the model was trained on, and a
manifest (command, data, git commit, machine, final metric), in one small file.

    save_model(path, model, kind="recall", task=task, manifest={...})
    model, info = load_model(path, kind="recall")     # info: {'kind', 'task' or 'meta', 'manifest'}

A file is ``{'format': FORMAT, 'kind': 'recall' | 'lm', 'model_config', 'model', 'task' (recall: the
RecallTask's fields) or 'meta' (lm: the character vocabulary), 'manifest'}``; the parameters are stored in float16
(``half=True``; buffers such as an SRF layer's random projection as they are) to keep the committed files at a few MB, and come back as float32. ``*.pt`` is git-ignored in
this repository, so the committed files end in ``.pth``.

Loading says clearly what is wrong: a missing file, an unreadable one, one that is not a long-context checkpoint
(a nanoGPT training checkpoint, say), one of the other kind (an LM where a recall model is expected), or weights
that do not fit the saved architecture: each a :class:`nanoGPT.checkpoint.CheckpointError` naming the file.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch

from nanoGPT.atomic import write_atomically
from nanoGPT.checkpoint import CheckpointError
from nanoGPT.model import GPT, GPTConfig

from .recall import RecallTask

FORMAT = "long_context/1"
KINDS = ("recall", "lm")
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
RECALL_CHECKPOINT = CHECKPOINT_DIR / "recall_exact.pth"        # trained on the CPU at n <= 256
RECALL_LONG_CHECKPOINT = CHECKPOINT_DIR / "recall_long.pth"    # the same, fine-tuned on a GPU at n <= 16384
LM_CHECKPOINT = CHECKPOINT_DIR / "lm_exact.pth"
# what the evaluation and the q/k/v sources use unless told otherwise: the models meant for long n
DEFAULT_CHECKPOINTS = {"recall": RECALL_LONG_CHECKPOINT, "lm": LM_CHECKPOINT}


def provenance() -> dict:
    """The git commit of the working tree (whether the code of long_context/ and nanoGPT/ differed from it, and
    which tracked files anywhere did: a model trained with a method depends on that method's package too), the
    machine and the time, for a manifest."""
    here = Path(__file__).resolve().parent
    git = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=here).stdout
    try:
        commit = git("rev-parse", "HEAD").strip() or None
        dirty = bool(git("status", "--porcelain", "--", str(here), str(here.parent / "nanoGPT")).strip())
        changed = sorted(line.split()[-1] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                         if line.strip())
    except (OSError, subprocess.SubprocessError):
        commit = dirty = changed = None
    machine = platform.node() + f" ({platform.machine()}, torch {torch.__version__}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    return {"git_commit": commit, "uncommitted_changes": dirty, "changed_files": changed, "machine": machine + ")",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def save_model(path, model: GPT, kind: str, *, task: RecallTask | None = None, meta: dict | None = None,
               manifest: dict | None = None, half: bool = True) -> Path:
    """Write ``model`` (its config records the attention each layer runs now: the method it was trained with, for
    a model trained with one) to ``path`` atomically; a JSON copy of the manifest goes beside it
    (``<path>.json``)."""
    if kind not in KINDS:
        raise ValueError(f"save_model: kind must be one of {KINDS}, got {kind!r}")
    if (kind == "recall") != (task is not None) or (kind == "lm") != (meta is not None):
        raise ValueError("save_model: a recall model needs task=, an LM needs meta= (its vocabulary)")
    # parameters in float16; buffers (an SRF layer's random projection, say) as they are: the model evaluates
    # with the features it was trained with
    weights = {k: (v.detach().half() if half and isinstance(v, torch.nn.Parameter) and v.is_floating_point()
                   else v.detach()).cpu() for k, v in model.state_dict(keep_vars=True).items()}
    state = {"format": FORMAT, "kind": kind, "model_config": model.config.to_dict(), "model": weights,
             "task": dataclasses.asdict(task) if task is not None else None, "meta": meta,
             "manifest": dict(manifest or {})}
    path = Path(path)
    write_atomically(path, lambda f: torch.save(state, f))
    manifest_text = json.dumps({"file": path.name, "kind": kind, "model_config": state["model_config"],
                                "task": state["task"], **state["manifest"]}, indent=2, default=str)
    write_atomically(path.with_suffix(path.suffix + ".json"), lambda f: f.write((manifest_text + "\n").encode()))
    return path


def load_model(path, kind: str | None = None, device="cpu") -> tuple[GPT, dict]:
    """(model in eval mode, float32, on ``device``; info ``{'kind', 'task', 'meta', 'manifest'}``), ``task`` a
    :class:`RecallTask` at the training length for a recall model. ``kind`` given: the file must hold that kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no long-context checkpoint at {path} (train one with `python -m "
                              f"long_context.train_recall` or `python -m long_context.train_lm`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format", "no format key") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a long-context checkpoint (expected format {FORMAT!r}, found "
                              f"{found!r}; a nanoGPT training checkpoint is loaded with nanoGPT.checkpoint)")
    if kind is not None and state["kind"] != kind:
        raise CheckpointError(f"{path} holds a {state['kind']!r} model, not the {kind!r} model asked for")
    try:
        model = GPT(GPTConfig(**state["model_config"]))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: the saved weights do not fit the saved architecture ({err})") from err
    task = RecallTask(**state["task"]) if state["task"] is not None else None
    info = {"kind": state["kind"], "task": task, "meta": state["meta"], "manifest": state["manifest"]}
    return model.to(device).eval(), info
