"""GPT.set_attention on chosen layers (issue 14) and the model without position embeddings (NoPE): layer
selection swaps exactly the layers named, the config records each layer's method through a checkpoint, a NoPE
model runs at any length, and checkpoints written before these options still load."""
import pytest
import torch

from nanoGPT.checkpoint import model_from_state
from nanoGPT.model import GPT, GPTConfig, select_layers

TINY = dict(block_size=8, vocab_size=11, n_layer=4, n_head=2, n_embd=16, dropout=0.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).double().eval()


@pytest.mark.parametrize("layers, expected", [(None, [0, 1, 2, 3]), ("all", [0, 1, 2, 3]), ("first:2", [0, 1]),
                                              ("last:1", [3]), ("first:0", []), ([2, 0], [0, 2]), ([-1], [3]),
                                              ("last:4", [0, 1, 2, 3])])
def test_select_layers(layers, expected):
    assert select_layers(layers, 4) == expected


@pytest.mark.parametrize("layers, match", [("first:5", "first:k"), ("middle:1", "first:k"), ("first:x", "first:k"),
                                           ([4], "out of range"), ([-5], "out of range"), (["1"], "int"),
                                           (1.5, "list")])
def test_bad_layers_are_refused(layers, match):
    with pytest.raises(ValueError, match=match):
        select_layers(layers, 4)


@pytest.mark.parametrize("layers, swapped", [("first:2", [0, 1]), ("last:1", [3]), ([1, 3], [1, 3])])
def test_set_attention_swaps_exactly_the_layers_named(layers, swapped):
    model = tiny_model()
    before = [b.attn.attention for b in model.blocks]
    model.set_attention("uniform", layers=layers, num_samples=2, seed=0)
    names = model.layer_attention_names()
    assert names == ["uniform" if i in swapped else "exact" for i in range(4)]
    assert all(model.blocks[i].attn.attention is before[i] for i in range(4) if i not in swapped)  # untouched
    assert [model.blocks[i].attn.attention.seed for i in swapped] == swapped  # seed + layer, as for all layers
    assert model.config.attention == "exact"  # the base method; layer_attention says what each layer runs
    assert model.config.layer_attention == [["uniform", {"num_samples": 2, "seed": 0}] if i in swapped
                                            else ["exact", {}] for i in range(4)]
    # a later call swaps more layers and keeps the others as they are now
    model.set_attention("exact", layers=[swapped[0]])
    assert model.layer_attention_names()[swapped[0]] == "exact"
    assert sum(n == "uniform" for n in model.layer_attention_names()) == len(swapped) - 1


def test_swapping_every_layer_back_records_one_method_and_restores_the_logits():
    model = tiny_model()
    idx = torch.randint(TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    exact_logits = model(idx)[0]
    model.set_attention("uniform", layers="last:2", num_samples=2, seed=0)
    partial = model(idx)[0]
    assert not torch.allclose(partial, exact_logits)
    model.set_attention("exact", layers="last:2")
    assert model.config.layer_attention is None and model.config.attention == "exact"
    torch.testing.assert_close(model(idx)[0], exact_logits, rtol=0, atol=0)


def test_per_layer_attention_survives_a_checkpoint():
    model = tiny_model()
    model.set_attention("uniform", layers=[0, 2], num_samples=3, seed=5)
    state = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    loaded = model_from_state(state).double().eval()
    assert loaded.layer_attention_names() == ["uniform", "exact", "uniform", "exact"]
    assert [loaded.blocks[i].attn.attention.seed for i in (0, 2)] == [5, 7]
    idx = torch.randint(TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0])


def test_bad_layer_attention_config_is_refused():
    with pytest.raises(ValueError, match="layer_attention"):
        GPTConfig(**{**TINY, "layer_attention": [["exact", {}]]})  # one entry for four layers
    with pytest.raises(ValueError, match=r"layer_attention\[1\]"):
        GPTConfig(**{**TINY, "layer_attention": [["exact", {}], "exact", ["exact", {}], ["exact", {}]]})
    with pytest.raises(ValueError, match="position_embedding"):
        GPTConfig(**{**TINY, "position_embedding": "rotary"})


def test_nope_model_has_no_position_table_and_runs_past_block_size():
    model = tiny_model(position_embedding="none")
    assert model.pos_emb is None and not any("pos_emb" in k for k in model.state_dict())
    idx = torch.randint(TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(2))
    logits, _ = model(idx)  # 40 > block_size = 8
    assert logits.shape == (1, 40, TINY["vocab_size"])
    # causal at any length: the logits of a prefix do not depend on the tokens after it
    torch.testing.assert_close(model(idx[:, :10])[0], logits[:, :10])
    # and a learned-position model still refuses a sequence longer than its table
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(idx)


def test_checkpoint_from_before_the_new_options_loads():
    model = tiny_model()
    config = model.config.to_dict()
    old = {k: v for k, v in config.items() if k not in ("position_embedding", "layer_attention")}
    loaded = model_from_state({"model": model.state_dict(), "model_config": old}).double().eval()
    assert loaded.config.position_embedding == "learned" and loaded.config.layer_attention is None
    idx = torch.randint(TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
