"""Issue 14 (last bullet): training on torch.distributed as upstream nanoGPT does (torchrun, DDP, the step's
micro-batches split across processes, only rank 0 evaluating and writing), checked on the CPU with gloo."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoGPT.checkpoint import load_checkpoint
from nanoGPT.data_loader import get_batch, load_meta, load_split
from nanoGPT.model import GPT
from nanoGPT.train import Ranks, train

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
RUN = ["--threads=1", "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--eval_iters=1",
       "--gradient_accumulation_steps=2"]


@pytest.mark.slow
def test_two_processes_train_as_one_on_the_same_global_batch(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nanoGPT.train", "config/train_tiny.py", "--progress=False", *RUN,
                           f"--out_dir={tmp_path / 'two'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("val loss") == 2  # only rank 0 logs its evaluations (iterations 2 and 4)
    one = train(tiny_config(tmp_path / "one", *RUN))
    two = load_checkpoint(tmp_path / "two")
    assert [r["iter"] for r in two["history"]] == [r["iter"] for r in one["history"]] == list(range(5))
    for a, b in zip(one["history"], two["history"]):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    single = load_checkpoint(tmp_path / "one")["model"]
    for name, weight in two["model"].items():
        torch.testing.assert_close(weight, single[name], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["ckpt.pt", "loss_curve.csv"]


def test_accumulation_must_split_evenly_across_processes(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 must be a multiple of the 2 processes"):
        Ranks.from_environment(3)
    monkeypatch.delenv("RANK")
    assert not Ranks.from_environment(3).distributed  # outside torchrun: one process


def test_accumulation_in_one_process_averages_the_micro_batches(tmp_path):
    """The first step's loss with two micro-batches of 8 is the initial model's loss on the 16 sequences."""
    cfg = tiny_config(tmp_path, "--max_iters=1", "--eval_iters=1", "--gradient_accumulation_steps=2")
    result = train(cfg)
    torch.manual_seed(cfg.seed)  # the run's initial weights and first two micro-batches, rebuilt
    model = GPT(cfg.model_config(load_meta()["vocab_size"]))
    generator = torch.Generator().manual_seed(cfg.seed)
    x, y = (torch.cat(parts) for parts in zip(*[get_batch(load_split("train"), cfg.batch_size, cfg.block_size,
                                                          generator) for _ in range(2)]))
    assert x.shape == (2 * cfg.batch_size, cfg.block_size)
    with torch.no_grad():
        assert result["history"][1]["train_loss"] == pytest.approx(model(x, y)[1].item(), rel=1e-6)
