"""common.linear_attention: the chunkwise form equals the reference (masked quadratic) form, state in and out; the
normaliser; the backend choice, and (CUDA with fla-core only, ids with 'cuda') fla's kernels against the reference."""
import pytest
import torch

import common.linear_attention as la
from common.linear_attention import (augment_values, chunk_linear_attention, chunk_states, fla_available,
                                     fla_chunk_linear_attention, linear_attention, normaliser, resolve_backend,
                                     split_augmented)

HAS_FLA = torch.cuda.is_available() and fla_available()


def features(b, h, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, n, m, generator=g, dtype=torch.float64)   # positive, as random features are


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(1, 1), (2, 2), (37, 37), (64, 64), (1, 37), (13, 37), (0, 5)])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunk_form_equals_reference(causal, nq, nk, chunk_size):
    q, k = features(2, 3, nq, 5, 0), features(2, 3, nk, 5, 1)
    v = torch.randn(2, 3, nk, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    state = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    for initial in (None, state):
        ref, ref_final = linear_attention(q, k, v, causal, initial_state=initial, output_final_state=True)
        out, final = chunk_linear_attention(q, k, v, causal, chunk_size, initial_state=initial,
                                            output_final_state=True)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(final, ref_final, atol=1e-12, rtol=1e-12)
        assert chunk_linear_attention(q, k, v, causal, chunk_size, initial_state=initial)[1] is None


def test_reference_is_the_definition_and_state_carries_a_sequence_in_pieces():
    """o_i = sum_{j <= i} (q_i . k_j) v_j written as a loop; and attending a sequence in two pieces, the second from
    the first's final state, equals attending it whole."""
    q, k = features(1, 2, 9, 3, 3), features(1, 2, 9, 3, 4)
    v = torch.randn(1, 2, 9, 2, dtype=torch.float64)
    loop = torch.stack([sum((q[:, :, i] * k[:, :, j]).sum(-1, keepdim=True) * v[:, :, j] for j in range(i + 1))
                        for i in range(9)], 2)
    torch.testing.assert_close(linear_attention(q, k, v, True)[0], loop)
    whole, whole_final = chunk_linear_attention(q, k, v, True, 4, output_final_state=True)
    first, state = chunk_linear_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], True, 4, output_final_state=True)
    second, final = chunk_linear_attention(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], True, 4, initial_state=state,
                                           output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 2), whole)
    torch.testing.assert_close(final, whole_final)


def test_chunk_states_forward_and_reverse_are_exclusive_sums():
    k, v = features(1, 1, 12, 3, 5).view(1, 1, 4, 3, 3), torch.randn(1, 1, 4, 3, 2, dtype=torch.float64)
    own = k.transpose(-2, -1) @ v
    before, final = chunk_states(k, v)
    after, _ = chunk_states(k, v, reverse=True)
    for c in range(4):
        torch.testing.assert_close(before[:, :, c], own[:, :, :c].sum(2))
        torch.testing.assert_close(after[:, :, c], own[:, :, c + 1:].sum(2))
    torch.testing.assert_close(final, own.sum(2))


def test_gradients_and_augmented_values():
    q, k = (features(1, 1, 7, 3, s).requires_grad_() for s in (6, 7))
    v = torch.randn(1, 1, 7, 2, dtype=torch.float64, requires_grad=True)
    for causal in (False, True):
        torch.autograd.gradcheck(lambda a, b, c: chunk_linear_attention(a, b, c, causal, 3)[0], (q, k, v))
    out = split_augmented(chunk_linear_attention(q, k, augment_values(v), True, 3)[0])
    weights = torch.tril(q @ k.transpose(-2, -1))
    torch.testing.assert_close(out, (weights / weights.sum(-1, keepdim=True)) @ v)


def test_bad_shapes_are_named():
    q, k, v = torch.rand(1, 1, 4, 3), torch.rand(1, 1, 4, 3), torch.rand(1, 1, 4, 2)
    with pytest.raises(ValueError, match="chunk_linear_attention: expected features"):
        chunk_linear_attention(q, torch.rand(1, 1, 4, 5), v)
    with pytest.raises(ValueError, match=r"linear_attention: initial_state must have shape \(B, H, m, Dv\)"):
        linear_attention(q, k, v, initial_state=torch.rand(1, 1, 2, 3))
    for form in (linear_attention, chunk_linear_attention):
        with pytest.raises(ValueError, match="causal needs Nq <= Nk"):
            form(torch.rand(1, 1, 6, 3), k, v, True)


def test_bfloat16_inputs_accumulate_the_states_in_float32():
    """8192 positions, 128 chunks of positive terms. The final state carries only the rounding of each chunk's own
    bfloat16 product, which averages out (measured 4e-4 relative); stored in bfloat16 it would be off by up to half
    its resolution, 2^-9 to 2^-8 (2e-3 to 4e-3), and a bfloat16 running sum worse. Outputs stay within 2e-2."""
    q, k = features(1, 1, 8192, 16, 8).bfloat16(), features(1, 1, 8192, 16, 9).bfloat16()
    v = torch.rand(1, 1, 8192, 4, dtype=torch.float64).bfloat16()
    out, final = chunk_linear_attention(q, k, v, True, 64, output_final_state=True)
    assert out.dtype == final.dtype == torch.float32
    ref, ref_final = chunk_linear_attention(q.double(), k.double(), v.double(), True, 64, output_final_state=True)
    assert ((out.double() - ref).abs() / ref.abs()).max() < 2e-2
    assert ((final.double() - ref_final).abs() / ref_final.abs()).max() < 1.5e-3


def test_rows_whose_terms_all_underflowed_give_zero_and_finite_gradients():
    """A query whose features are all zero (every term underflowed) has numerator = denominator = 0: the output is 0
    (split_augmented's floor on the denominator), and the gradients stay finite."""
    q = features(1, 1, 4, 3, 10)
    q[:, :, 1] = 0
    q.requires_grad_()
    k = features(1, 1, 4, 3, 11).requires_grad_()
    v = torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    out = split_augmented(chunk_linear_attention(q, k, augment_values(v), False)[0])
    assert (out[:, :, 1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(1, 1), (37, 37), (13, 37), (0, 5)])
def test_normaliser_is_linear_attention_with_values_one(causal, nq, nk):
    q, k = features(2, 3, nq, 5, 12), features(2, 3, nk, 5, 13)
    ones = torch.ones(2, 3, nk, 1, dtype=torch.float64)
    z0 = torch.rand(2, 3, 5, dtype=torch.float64)
    for initial in (None, z0):
        ref, _ = linear_attention(q, k, ones, causal, initial_state=None if initial is None else initial[..., None])
        torch.testing.assert_close(normaliser(q, k, causal, initial), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n,chunk_size", [(1, 4), (4, 4), (5, 4), (37, 4), (64, 8), (200, 64)])
def test_prefix_sums_equal_cumsum(n, chunk_size):
    x = features(2, 3, n, 5, 16)
    torch.testing.assert_close(la.prefix_sums(x, torch.float64, chunk_size), x.cumsum(2), atol=1e-12, rtol=1e-12)
    assert la.prefix_sums(x.bfloat16(), torch.float32, chunk_size).dtype == torch.float32
    small = x[:1, :1, :, :2].detach().requires_grad_()
    torch.autograd.gradcheck(lambda t: la.prefix_sums(t, torch.float64, chunk_size), (small,))


def test_normaliser_accumulates_half_precision_in_float32():
    q, k = features(1, 1, 4096, 8, 14).bfloat16(), features(1, 1, 4096, 8, 15).bfloat16()
    z = normaliser(q, k, True)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), normaliser(q.double(), k.double(), True), rtol=1e-6, atol=0)


def test_backend_choice_on_the_cpu_never_needs_fla(monkeypatch):
    """'auto' is the PyTorch form on the CPU (and for float32, and non-causal); 'fla' where it cannot run raises a
    RuntimeError naming the alternative; an unknown backend is a ValueError naming the argument."""
    q = torch.rand(1, 1, 4, 3)
    for causal in (False, True):
        assert resolve_backend("auto", q, causal) == resolve_backend("torch", q, causal) == "torch"
        assert resolve_backend("auto", q.bfloat16(), causal) == "torch"
    with pytest.raises(ValueError, match=r"attend: attn_fn must be one of \('auto', 'torch', 'fla'\), got 'cuda'"):
        resolve_backend("cuda", q, True, "attend", "attn_fn")
    monkeypatch.setattr(la, "fla_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"backend='fla' needs flash-linear-attention and Triton \(pip install "
                                           r"fla-core\): (not installed|installed, but).*; use backend='torch'"):
        resolve_backend("fla", q, True)
    with pytest.raises(RuntimeError, match="fla_chunk_linear_attention: backend='fla' needs"):
        fla_chunk_linear_attention(q, q, q, True)
    monkeypatch.setattr(la, "fla_available", lambda: True)  # installed, but the tensors are not on a GPU
    with pytest.raises(RuntimeError, match="backend='fla' runs Triton kernels on CUDA devices, got tensors on cpu"):
        resolve_backend("fla", q, True)
    assert resolve_backend("auto", q.bfloat16(), True) == "torch"


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not HAS_FLA, reason="needs a CUDA device and fla-core")
@pytest.mark.parametrize("nq,nk,m,e", [(200, 200, 64, 64), (70, 333, 63, 63)])
def test_cuda_fla_equals_reference(nq, nk, m, e):
    """Outputs, final states and gradients (q, k, v, initial state) of fla's kernels against the float64 reference on
    the same inputs, in float32, which fla multiplies in TF32 (unit roundoff 2^-11): a few roundings, relative
    Frobenius error at most 4 x 2^-11. Nq < Nk folds the first keys into the state; odd m and Dv are padded with a
    zero column. Every shape here pads to m = Dv = 64 and passes a state in and out, so fla autotunes once for the
    whole test (about 40 kernel compilations); bfloat16 is checked through the methods (tests/srf_attention/
    test_backends.py), whose calls share the GPU check's autotuning."""
    dtype = torch.float32
    tol = 4 * 2.0 ** -11
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.rand(2, 3, nq, m, device="cuda", generator=gen).to(dtype)
    k = torch.rand(2, 3, nk, m, device="cuda", generator=gen).to(dtype)
    v = torch.randn(2, 3, nk, e, device="cuda", generator=gen).to(dtype)
    s0 = torch.rand(2, 3, m, e, device="cuda", generator=gen)
    ins = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    out, final = fla_chunk_linear_attention(*ins[:3], True, initial_state=ins[3], output_final_state=True)
    ref, ref_final = linear_attention(*ins64[:3], True, initial_state=ins64[3], output_final_state=True)
    assert out.dtype == final.dtype == torch.float32
    assert _relative(out, ref) < tol and _relative(final, ref_final) < tol
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad((out * grad_out).sum() + final.sum(), ins)
    ref_grads = torch.autograd.grad((ref * grad_out).sum() + ref_final.sum(), ins64)
    for g, r in zip(grads, ref_grads):
        assert _relative(g, r) < tol
    # non-causal is the PyTorch form
    out_nc, _ = fla_chunk_linear_attention(*ins[:3], False, initial_state=ins[3])
    torch.testing.assert_close(out_nc, chunk_linear_attention(*ins[:3], False, initial_state=ins[3])[0])


@pytest.mark.skipif(not HAS_FLA, reason="needs a CUDA device and fla-core")
def test_cuda_fla_autotuning_is_limited_to_the_kept_configurations():
    from fla.ops.common import chunk_h

    q = torch.rand(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    fla_chunk_linear_attention(q, q, q, True)
    kernels = la.fla_state_kernels(chunk_h)
    assert len(kernels) == 2
    for kernel in kernels:
        assert len(kernel.configs) == 8  # four tilings x two pipeline depths, four warps
        assert {(c.num_warps, c.num_stages) for c in kernel.configs} == {(4, 2), (4, 3)}


def test_auto_takes_fla_only_where_it_was_verified():
    """'auto' picks fla only for causal bfloat16 CUDA features up to FLA_AUTO_MAX_FEATURES (the H100 run at the
    default budgets, m >= 256, failed to compile or ran past its time limit)."""
    from common.linear_attention import FLA_AUTO_MAX_FEATURES, auto_takes_fla
    m = FLA_AUTO_MAX_FEATURES
    assert auto_takes_fla(True, "cuda", torch.bfloat16, m)
    assert not auto_takes_fla(True, "cuda", torch.bfloat16, m + 1)
    assert not auto_takes_fla(False, "cuda", torch.bfloat16, m)
    assert not auto_takes_fla(True, "cpu", torch.bfloat16, m)
    assert not auto_takes_fla(True, "cuda", torch.float32, m)
