"""Prefill (parallel / chunkwise-recurrent / recurrent), token-by-token generation and the O(m Dv) decoding state
of `srf` / `performer`: all equal the causal train mode, and the state equals its defining sums."""
import pytest
import torch

import common
from common.data import synthetic_qkv
from srf_attention.fast_attention import FastAttention, SRFState

PREFILL = ("parallel", "chunkwise-recurrent", "recurrent")


def growing_keys(n, d, seed):
    """Keys whose norms grow along the sequence, so that nearly every new key raises key_maxima and the
    recurrent forms must rescale their state (the path a constant-norm input would not exercise)."""
    x = synthetic_qkv("gaussian", 2, 2, n, n, d, value_dim=3, dtype=torch.float64, seed=seed)
    growth = torch.linspace(0.3, 3.0, n, dtype=torch.float64).view(1, 1, n, 1)
    return x.q, x.k * growth, x.v


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_prefill_modes_equal_each_other_and_train_mode(chunk_size):
    q, k, v = growing_keys(23, 8, seed=0)
    fast = FastAttention(8, 10, causal=True, chunk_size=chunk_size, seed=0)
    train = fast(q, k, v)
    results = [fast(q, k, v, mode="prefill", attn_fn=fn) for fn in PREFILL]
    results.append(fast.prefill(q, k, v, "recurrent"))  # the method itself, default scale 1/sqrt(D)
    for o, kv, key_maxima, denominator in results:
        torch.testing.assert_close(o, train, rtol=1e-10, atol=1e-12)
        for got, want in zip((kv, key_maxima, denominator), results[0][1:]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the state is its definition: sums of phi(k_j) exp(-key_maxima) [v_j, 1] over the prompt
    _, kv, key_maxima, denominator = results[0]
    kf, c = fast.key_features(k, 8 ** -0.5)
    torch.testing.assert_close(key_maxima, c.view(2, 2))
    torch.testing.assert_close(kv, kf.transpose(-2, -1) @ v)
    torch.testing.assert_close(denominator, kf.sum(2))
    assert kv.shape == (2, 2, 10, 3) and denominator.shape == (2, 2, 10)


@pytest.mark.parametrize("prompt", [1, 9])
def test_generation_token_by_token_equals_causal_forward(prompt):
    q, k, v = growing_keys(30, 8, seed=1)
    fast = FastAttention(8, 16, causal=True, chunk_size=4, seed=1)
    o, kv, key_maxima, denominator = fast(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], mode="prefill")
    outs = [o]
    for t in range(prompt, 30):
        o, kv, key_maxima, denominator = fast(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], mode="generation",
                                              kv=kv, key_maxima=key_maxima, denominator=denominator)
        assert kv.shape == (2, 2, 16, 3)  # constant size, whatever the context length
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2), fast(q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["srf", "performer"])
def test_step_uses_constant_state(name):  # step() == the causal forward: tests/contract
    q, k, v = growing_keys(26, 8, seed=2)
    attn = common.get_attention(name, nb_features=12, chunk_size=4, seed=0)
    state = attn.init_state()
    assert isinstance(state, SRFState) and len(state) == 0
    attn.step(q[:, :, :7], k[:, :, :7], v[:, :, :7], state)
    for t in range(7, 26):
        attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        assert state.kv.shape == (2, 2, 12, 3) and state.denominator.shape == (2, 2, 12)
    assert len(state) == 26


def test_float32_generation_matches_train_mode():
    x = synthetic_qkv("gaussian", 1, 4, 64, 64, 32, seed=3)
    attn = common.get_attention("srf", nb_features=32, seed=0)
    state = attn.init_state()
    outs = [attn.step(x.q[:, :, t:t + 1], x.k[:, :, t:t + 1], x.v[:, :, t:t + 1], state) for t in range(64)]
    torch.testing.assert_close(torch.cat(outs, 2), attn(x.q, x.k, x.v, causal=True), rtol=1e-4, atol=1e-5)


def test_bad_states_and_modes_are_named():
    q, k, v = growing_keys(6, 8, seed=4)
    fast = FastAttention(8, 10, causal=True, seed=0)
    _, kv, key_maxima, denominator = fast(q, k, v, mode="prefill")
    one = (q[:, :, :1], k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="state kv must have shape .* a state from another shape"):
        fast(*one, mode="generation", kv=kv[:1], key_maxima=key_maxima[:1], denominator=denominator[:1])
    with pytest.raises(ValueError, match="state denominator must have shape"):
        fast(*one, mode="generation", kv=kv, key_maxima=key_maxima, denominator=denominator[..., :5])
    with pytest.raises(ValueError, match="all of kv, key_maxima, denominator"):
        fast(*one, mode="generation", kv=kv)
    with pytest.raises(ValueError, match="unknown attn_fn for mode='prefill'"):
        fast(q, k, v, mode="prefill", attn_fn="torch")
    with pytest.raises(ValueError, match="build it with causal=True"):
        FastAttention(8, 10, causal=False)(q, k, v, mode="prefill")
    with pytest.raises(ValueError, match="one length"):
        fast(q[:, :, :2], k, v, mode="prefill")
    attn = common.get_attention("srf", nb_features=10)
    with pytest.raises(TypeError, match="state must come from init_state"):
        attn.step(*one, common.KVCache())


@pytest.mark.parametrize("name", ["srf", "performer"])
def test_nanogpt_decodes_with_the_constant_state(name):
    """A small GPT using the method: feeding tokens one at a time through SRFState equals the full forward."""
    from nanoGPT.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=11, n_layer=2, n_head=2, n_embd=16, attention=name,
                          attention_options={"nb_features": 16, "seed": 0})).double().eval()
    idx = torch.randint(11, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model.hidden_states(idx)
    states = [block.attn.attention.init_state() for block in model.blocks]
    steps = [model.hidden_states(idx[:, :5], states)]
    steps += [model.hidden_states(idx[:, t:t + 1], states, start=t) for t in range(5, 20)]
    assert all(isinstance(s, SRFState) and len(s) == 20 and s.kv.shape == (2, 2, 16, 8) for s in states)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-10)
