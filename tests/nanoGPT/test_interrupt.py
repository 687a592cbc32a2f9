"""Issue 17, item 5: SIGINT / SIGTERM during training saves a checkpoint that resumes bit for bit, and exits
cleanly; a run is resumable from its first iteration on; resuming without a checkpoint is a clear error."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoGPT import train as train_module
from nanoGPT.checkpoint import checkpoint_path, load_checkpoint, load_model
from nanoGPT.train import TrainingInterrupted, train

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]
# Dropout and a randomised method: the global torch stream, the batch generator and the method's generator all
# have to be saved and restored for the resumed run to be bit-exact.
RUN = ["--max_iters=12", "--lr_decay_iters=12", "--eval_interval=5", "--eval_iters=2", "--dropout=0.1",
       "--attention=uniform", "--attention_options={'num_samples': 4}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    return train(tiny_config(out_dir, *RUN)), out_dir


def signal_on_batch(monkeypatch, call: int, signals: list[int]) -> None:
    """Send ``signals`` to this process when the ``call``-th batch is drawn, counting the training batches and
    the evaluation batches together (evaluation draws its own: a signal can land in the middle of one)."""
    calls = {"n": 0}

    def wrap(get_batch):
        def drawing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                for signum in signals:
                    os.kill(os.getpid(), signum)
            return get_batch(*args, **kwargs)
        return drawing

    from nanoGPT import evaluate as evaluate_module
    monkeypatch.setattr(train_module, "get_batch", wrap(train_module.get_batch))
    monkeypatch.setattr(evaluate_module, "get_batch", wrap(evaluate_module.get_batch))


# Batches drawn: 4 by the iteration-0 evaluation (2 splits x 2), then one per step and 4 per evaluation (after
# steps 5, 10 and 12). Call 2: inside the first evaluation; 6: step 2; 11: inside the evaluation after step 5;
# 24: the last step; 27: inside the final evaluation.
@pytest.mark.parametrize("call, stopped_at, signum", [(2, 0, signal.SIGINT), (6, 2, signal.SIGTERM),
                                                      (11, 5, signal.SIGINT), (24, 12, signal.SIGTERM),
                                                      (27, 12, signal.SIGINT)])
def test_signal_saves_a_checkpoint_that_resumes_bit_exact(call, stopped_at, signum, uninterrupted, tmp_path,
                                                          monkeypatch, capsys):
    whole, whole_dir = uninterrupted
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_on_batch(monkeypatch, call, [signum])
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tiny_config(tmp_path, *RUN))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert stopped.value.signum == signum and stopped.value.iter_num == stopped_at
    assert f"{signal.Signals(signum).name} at iter {stopped_at}: saved a checkpoint" in capsys.readouterr().err
    assert load_checkpoint(tmp_path)["iter_num"] == stopped_at
    monkeypatch.undo()
    resumed = train(tiny_config(tmp_path, *RUN, "--init_from=resume"))
    assert resumed["history"] == whole["history"]
    a, _ = load_model(whole_dir)
    b, _ = load_model(tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    signal_on_batch(monkeypatch, 7, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(tiny_config(tmp_path, *RUN))
    assert not isinstance(stopped.value, TrainingInterrupted)
    assert load_checkpoint(tmp_path)["iter_num"] == 0  # the iteration-0 checkpoint, intact
    assert not list(tmp_path.glob("*.tmp"))


def test_a_short_run_is_resumable_before_its_first_evaluation(tmp_path):
    """A 50-step run with eval_interval 250 used to have no checkpoint until it finished; now one is written at
    iteration 0, so even a run killed without a signal (kill -9) can be resumed."""
    train(tiny_config(tmp_path, "--max_iters=0", "--eval_interval=250", "--eval_iters=1"))
    assert load_checkpoint(tmp_path)["iter_num"] == 0
    resumed = train(tiny_config(tmp_path, "--max_iters=3", "--eval_interval=250", "--eval_iters=1",
                                "--init_from=resume"))
    assert resumed["iter_num"] == 3


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train_module.main(["config/train_tiny.py", f"--out_dir={tmp_path}", "--init_from=resume"])
    assert isinstance(exit_.value.code, str)  # a message on stderr and status 1, no traceback
    assert exit_.value.code.startswith("nanoGPT.train: no checkpoint at") and str(tmp_path) in exit_.value.code


@pytest.mark.slow
def test_sigint_to_a_training_process(tmp_path):
    """Ctrl-C on a real `python -m nanoGPT.train`: status 130, a message and no traceback, and the checkpoint
    it leaves continues to the same losses as the uninterrupted run (the same 12-step run, made 100 steps long
    with one evaluation at the end, so that the signal lands in the middle)."""
    run = ["config/train_tiny.py", "--progress=False", "--threads=1", "--max_iters=100", "--lr_decay_iters=100",
           "--eval_interval=100", "--eval_iters=1", *RUN[4:]]
    proc = subprocess.Popen([sys.executable, "-m", "nanoGPT.train", *run, f"--out_dir={tmp_path}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint_path(tmp_path).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the iteration-0 checkpoint marks the start of the steps
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "SIGINT at iter" in err and "saved a checkpoint" in err
    stopped_at = load_checkpoint(tmp_path)["iter_num"]
    assert 0 <= stopped_at < 100
    resumed = train(tiny_config(tmp_path, *run[1:], "--init_from=resume"))
    whole = train(tiny_config(tmp_path / "whole", *run[1:]))
    assert resumed["history"] == whole["history"]
