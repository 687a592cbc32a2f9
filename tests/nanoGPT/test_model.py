"""The GPT: exact attention matches a plain reference forward; attention swap; cached == uncached generation."""
import math

import pytest
import torch

import common
from common import registry
from nanoGPT.model import GPT, GPTConfig

TINY = dict(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).double().eval()


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The GPT forward written out step by step: explicit per-head softmax over the causal prefix."""
    cfg = model.config
    hd = cfg.n_embd // cfg.n_head
    t = idx.shape[1]

    def ln(x, mod):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + mod.eps) * mod.weight
        return y if mod.bias is None else y + mod.bias

    def linear(x, mod):
        return x @ mod.weight.T + (0 if mod.bias is None else mod.bias)

    x = model.token_emb.weight[idx] + model.pos_emb.weight[:t]
    for block in model.blocks:
        h = ln(x, block.ln_attn)
        qkv = linear(h, block.attn.qkv_proj)
        q, k, v = qkv[..., :cfg.n_embd], qkv[..., cfg.n_embd:2 * cfg.n_embd], qkv[..., 2 * cfg.n_embd:]
        out = torch.zeros_like(h)
        for b in range(idx.shape[0]):
            for head in range(cfg.n_head):
                cols = slice(head * hd, (head + 1) * hd)
                for i in range(t):
                    scores = torch.stack([q[b, i, cols] @ k[b, j, cols] / math.sqrt(hd) for j in range(i + 1)])
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    out[b, i, cols] = sum(weights[j] * v[b, j, cols] for j in range(i + 1))
        x = x + linear(out, block.attn.out_proj)
        h = ln(x, block.ln_mlp)
        up = linear(h, block.mlp.up)
        gelu = 0.5 * up * (1 + torch.erf(up / math.sqrt(2)))  # exact GELU (Hendrycks & Gimpel 2016)
        x = x + linear(gelu, block.mlp.down)
    return ln(x, model.ln_final) @ model.token_emb.weight.T


@pytest.mark.parametrize("bias", [True, False])
def test_exact_matches_reference_forward(bias):
    model = tiny_model(bias=bias)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(TINY["vocab_size"], (2, TINY["block_size"]), generator=gen)
    targets = torch.randint(TINY["vocab_size"], (2, TINY["block_size"]), generator=gen)
    logits, loss = model(idx, targets)
    ref = reference_forward(model, idx)
    torch.testing.assert_close(logits, ref, rtol=1e-10, atol=1e-10)
    ref_loss = -torch.log_softmax(ref, -1).gather(-1, targets.unsqueeze(-1)).mean()
    assert abs(loss.item() - ref_loss.item()) < 1e-10


def test_untrained_loss_is_near_log_vocab():
    # Small initial weights give nearly uniform predictions: loss ~ ln(vocab_size) on random targets.
    model = tiny_model()
    gen = torch.Generator().manual_seed(4)
    idx, targets = (torch.randint(TINY["vocab_size"], (16, 8), generator=gen) for _ in range(2))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(TINY["vocab_size"])) < 0.1


def test_set_attention_swaps_every_layer_and_keeps_weights():
    model = tiny_model()
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    exact_logits = model(idx)[0]
    model.set_attention("uniform", num_samples=2, seed=0)
    assert all(b.attn.attention.name == "uniform" for b in model.blocks)
    assert [b.attn.attention.seed for b in model.blocks] == [0, 1]  # seed + layer: independent layers
    assert model.config.attention == "uniform"
    assert not torch.allclose(model(idx)[0], exact_logits)
    model.set_attention("exact")
    torch.testing.assert_close(model(idx)[0], exact_logits)


def test_non_causal_method_is_refused(monkeypatch):
    class NonCausal(common.AttentionMethod):
        supports_causal = False

        def attend(self, q, k, v, causal, scale):
            return common.softmax_attention(q, k, v, causal, scale)

    monkeypatch.setitem(registry._REGISTRY, "noncausal_test", NonCausal)
    with pytest.raises(ValueError, match="noncausal_test.*causal"):
        tiny_model(attention="noncausal_test")
    with pytest.raises(ValueError, match="causal"):
        tiny_model().set_attention("noncausal_test")


@pytest.mark.parametrize("bad, match", [(dict(n_embd=15), "divisible"), (dict(n_layer=0), "n_layer"),
                                        (dict(dropout=1.0), "dropout"), (dict(attention="nope"), "unknown attention")])
def test_bad_config_names_the_field(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GPT(GPTConfig(**{**TINY, **bad}))


def test_bad_input_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 11, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.long"):
        model(torch.zeros(1, 4))


def test_cached_generation_equals_uncached():
    """Same random stream, cached and uncached decoding pick the same tokens, past the block length too."""
    model = tiny_model()
    prompt = torch.randint(TINY["vocab_size"], (3, 3), generator=torch.Generator().manual_seed(2))
    outs = [model.generate(prompt, 20, temperature=1.0, top_k=5, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert outs[0].shape == (3, 23)
    assert torch.equal(outs[0], outs[1])


def test_cached_logits_equal_full_forward():
    """Feeding tokens one at a time through the decoding states gives the full causal forward's logits."""
    model = tiny_model()
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    full = model(idx)[0]
    states = [b.attn.attention.init_state() for b in model.blocks]
    steps = [model.lm_head(model.hidden_states(idx[:, t:t + 1], states, start=t)) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    model(idx, idx)[1].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in model.parameters())
