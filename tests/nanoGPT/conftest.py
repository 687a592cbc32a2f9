"""Shared fixtures of the nanoGPT tests: the tiny config trained once per session."""
import pytest

from nanoGPT.configurator import load_config
from nanoGPT.train import TrainConfig, train


def tiny_config(out_dir, *overrides):
    """The tiny test config (nanoGPT/config/train_tiny.py) writing to ``out_dir``, quiet, plus overrides."""
    return load_config(TrainConfig, ["config/train_tiny.py", f"--out_dir={out_dir}", "--progress=False",
                                     *overrides])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny model trained 50 steps with exact attention: (train() result, out_dir)."""
    out_dir = tmp_path_factory.mktemp("tiny_exact")
    return train(tiny_config(out_dir)), out_dir
