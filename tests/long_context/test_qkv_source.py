"""The long-context models' q/k/v as input sources of common.compare (issue 14): discovered by common.data, the
shapes of the model's heads, seeded and repeatable, and clear errors for lengths a model cannot take."""
import pytest
import torch

from common.data import InputSpec, input_sources, make_input
from long_context.qkv_source import long_context_qkv
from nanoGPT.capture_qkv import capture_qkv


def test_common_data_discovers_the_sources():
    assert {"recall", "lm"} <= set(input_sources())
    assert not {"recall", "lm"} & set(input_sources(default_only=True))  # asked for by name only


@pytest.mark.parametrize("n", [40, 300])
def test_recall_source_shapes_and_determinism(recall_model, n):
    model, _ = recall_model
    x = make_input("recall", n, InputSpec(seed=3))
    heads, head_dim = model.config.n_head, model.config.n_embd // model.config.n_head
    assert x.q.shape == x.k.shape == x.v.shape == (1, heads, n, head_dim) and x.q.dtype == torch.float32
    y = make_input("recall", n, InputSpec(seed=3))
    assert all(torch.equal(a, b) for a, b in ((x.q, y.q), (x.k, y.k), (x.v, y.v)))
    z = make_input("recall", n, InputSpec(seed=4))
    assert not torch.equal(x.k, z.k)  # another sequence
    assert "recall model, layer 0" in x.source  # the first layer by default: the retrieval layer


def test_layer_and_dtype(recall_model):
    first = long_context_qkv("recall", 64, dtype=torch.float64)
    assert first.q.dtype == torch.float64 and "layer 0" in first.source
    last = long_context_qkv("recall", 64, layer=-1)
    assert "layer 1" in last.source and not torch.allclose(first.q.float(), last.q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")
def test_capture_runs_on_the_requested_device():
    on_gpu = make_input("recall", 256, InputSpec(device="cuda", dtype=torch.bfloat16))
    on_cpu = make_input("recall", 256, InputSpec())
    assert on_gpu.q.device.type == "cuda" and on_gpu.q.dtype == torch.bfloat16
    torch.testing.assert_close(on_gpu.k.float().cpu(), on_cpu.k, rtol=2e-2, atol=2e-2)


def test_lm_source_is_the_models_qkv_on_the_validation_text(tiny_lm_path):
    x = long_context_qkv("lm", 48, path=tiny_lm_path)
    assert x.q.shape == (1, 2, 48, 8)
    from long_context.checkpoints import load_model
    from nanoGPT.data_loader import load_split
    model, _ = load_model(tiny_lm_path, "lm")
    tokens = torch.as_tensor(load_split("val")[:48].astype("int64")).unsqueeze(0)
    q, k, v = capture_qkv(model, tokens, 0)
    assert torch.equal(x.q, q) and torch.equal(x.k, k) and torch.equal(x.v, v)
    with pytest.raises(ValueError, match="exceeds the LM's block_size=64"):
        long_context_qkv("lm", 65, path=tiny_lm_path)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="too short"):
        long_context_qkv("recall", 10)
    with pytest.raises(ValueError, match="positive int"):
        long_context_qkv("recall", 0)
    with pytest.raises(ValueError, match="kind"):
        long_context_qkv("vision", 64)
