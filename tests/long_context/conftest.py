"""Shared fixtures of the long-context tests: the committed recall model and a tiny LM checkpoint."""
import pytest
import torch

from long_context.checkpoints import RECALL_CHECKPOINT, load_model, save_model
from nanoGPT.data_loader import load_meta
from nanoGPT.model import GPT, GPTConfig


@pytest.fixture(scope="session")
def recall_model():
    """The committed recall checkpoint: (model, info)."""
    return load_model(RECALL_CHECKPOINT, "recall")


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory):
    """An untrained tiny character LM (block 64, 2 layers) saved as a long-context checkpoint."""
    torch.manual_seed(0)
    meta = load_meta()
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=16, vocab_size=meta["vocab_size"]))
    path = tmp_path_factory.mktemp("lm") / "lm.pth"
    save_model(path, model, "lm", meta={k: meta[k] for k in ("vocab_size", "stoi", "itos")},
               manifest={"command": "tests/long_context/conftest.py (untrained)"})
    return path
