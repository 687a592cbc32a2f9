"""The linear-attention core (attn_fn 'auto' | 'torch' | 'fla' | 'flash') and the feature map (feature_kernel 'torch' |
'auto' | 'triton') of srf / performer: on the CPU 'auto' is the PyTorch path and the GPU-only choices refuse
clearly; on a CUDA device (tests whose ids contain 'cuda', run with ``pytest tests/srf_attention -k cuda``) each
equals the PyTorch path, outputs and gradients, and the GPU check script runs; on the CPU it degrades to notes."""
import csv

import pytest
import torch

import common
import common.linear_attention as la
from common.data import synthetic_qkv
from common.random_features import positive_random_features, random_matrix
from srf_attention import gpu_check
from srf_attention.fast_attention import FastAttention
from srf_attention.triton_features import fused_features_available, fused_positive_random_features

HAS_CUDA = torch.cuda.is_available()
HAS_FLA = HAS_CUDA and la.fla_available()
HAS_TRITON = HAS_CUDA and fused_features_available(torch.zeros(1, 1, device="cuda"), torch.zeros(1, 1))


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", ["srf", "performer"])
def test_auto_is_the_torch_path_on_the_cpu(name):
    x = synthetic_qkv("gaussian", 1, 2, 50, 70, 16, dtype=torch.bfloat16)
    for causal in (False, True):
        outs = [common.get_attention(name, nb_features=16, seed=0, attn_fn=attn_fn, feature_kernel=kernel)(
            x.q, x.k, x.v, causal=causal) for attn_fn, kernel in (("torch", "torch"), ("auto", "auto"))]
        assert torch.equal(outs[0], outs[1])
    default = common.get_attention(name)
    assert default.attn_fn == default.feature_kernel == "auto"


@pytest.mark.parametrize("name", ["srf", "performer"])
def test_auto_compares_the_feature_count_not_the_head_size(name, monkeypatch):
    """'auto' decides on the number of random features m, not on the head size d of the raw queries (it compared d
    until the long-context run on the H100: with d = 32 and m = 128 'auto' took fla's kernels, which faulted)."""
    asked = []
    monkeypatch.setattr(la, "auto_takes_fla", lambda causal, device_type, dtype, n_features: asked.append(n_features))
    x = synthetic_qkv("gaussian", 1, 2, 8, 8, 32, dtype=torch.bfloat16)
    common.get_attention(name, nb_features=128, seed=0)(x.q, x.k, x.v, causal=True)
    assert asked == [128]


def test_gpu_only_choices_refuse_on_the_cpu_naming_the_alternative_and_change_nothing(monkeypatch):
    x = synthetic_qkv("gaussian", 1, 1, 8, 8, 8)
    fast = FastAttention(8, 8, causal=True, seed=0).train().redraw_on_call_(True)
    before = fast.projection.clone()
    with pytest.raises(RuntimeError, match="attn_fn='fla' (needs flash-linear-attention|runs Triton kernels on CUDA)"
                                           ".*use attn_fn='torch'"):
        fast(x.q, x.k, x.v, attn_fn="fla")
    monkeypatch.setattr(la, "fla_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"attn_fn='fla' needs flash-linear-attention and Triton \(pip install "
                                           r"fla-core\): (not installed|installed, but).*; use attn_fn='torch'"):
        fast(x.q, x.k, x.v, attn_fn="fla")
    triton_fast = FastAttention(8, 8, causal=True, seed=0, feature_kernel="triton").train().redraw_on_call_(True)
    with pytest.raises(RuntimeError, match="feature_kernel='triton' is a Triton kernel for CUDA tensors.*"
                                           "use feature_kernel='torch'"):
        triton_fast(x.q, x.k, x.v)
    assert torch.equal(fast.projection, before) and torch.equal(triton_fast.projection, before)
    with pytest.raises(RuntimeError, match="use common.random_features.positive_random_features"):
        fused_positive_random_features(x.q, fast.projection, 0.1)
    with pytest.raises(ValueError, match="srf: unknown feature_kernel 'cuda'|srf: feature_kernel"):
        common.get_attention("srf", feature_kernel="cuda")
    with pytest.raises(ValueError, match="FastAttention: .*attn_fn"):
        fast(x.q, x.k, x.v, attn_fn="triton")


def test_gpu_check_degrades_to_notes_on_the_cpu(tmp_path):
    rows = gpu_check.run([32], device="cpu", dtype=torch.bfloat16, repeats=1, time_budget_s=60,
                         path=tmp_path / "srf_gpu.csv")
    with open(tmp_path / "srf_gpu.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == gpu_check.COLUMNS
    whole = [r for r in rows if r["part"] == "all"]
    variants = {(r["method"], r["attn_fn"], r["feature_kernel"]) for r in whole}
    assert variants == {("exact", "-", "-"), *gpu_check.VARIANTS, *gpu_check.SMALLEST_ONLY}
    for r in whole:
        runs_here = r["attn_fn"] in ("-", "torch") and r["feature_kernel"] in ("-", "torch")
        if runs_here:
            assert r["time_ms"] > 0 and "note" not in r
        else:
            assert r["note"].startswith("unavailable: RuntimeError") and "time_ms" not in r
        if runs_here:
            # exact in bfloat16 is within bfloat16 rounding of float32 exact; 16 random features are not
            assert (r["rel_err_vs_exact_fp32"] < 2e-2) == (r["method"] == "exact")
    assert {r["pass"] for r in whole} == {"fwd", "fwd+bwd"}
    pieces = [r for r in rows if r["part"] != "all"]
    assert {(r["part"], r["attn_fn"], r["feature_kernel"]) for r in pieces} == {
        ("features", "-", "torch"), ("features", "-", "triton"), ("core", "torch", "-"), ("core", "fla", "-"),
        ("normaliser", "fla", "-")}
    assert len(pieces) == 10 and {r["pass"] for r in pieces} == {"fwd", "fwd+bwd"}
    assert all(("time_ms" in r) == (r["feature_kernel"] != "triton" and r["attn_fn"] != "fla" or
                                   r["part"] == "normaliser") for r in pieces)
    skipped = gpu_check.run([32], device="cpu", repeats=1, time_budget_s=0)
    assert all(r["note"] == "skipped: time budget" for r in skipped)


@pytest.mark.skipif(not HAS_FLA, reason="needs a CUDA device and fla-core")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["srf", "performer"])
def test_cuda_fla_equals_the_torch_path(name, causal):
    """Outputs and gradients of attn_fn='fla' in bfloat16 against float64 of the same inputs and features: no worse
    than our own PyTorch path in bfloat16, within 2x and one bfloat16 spacing (2^-8). (float32 through fla, in TF32,
    is checked against the reference in tests/common/test_linear_attention.py.)"""
    dtype = torch.bfloat16
    x = synthetic_qkv("clustered", 1, 2, 300, 300, 64, seed=1, dtype=dtype, device="cuda")
    ulp = 2.0 ** -8
    grad_out = torch.randn_like(x.v)
    results = {}
    for attn_fn, cast in (("fla", dtype), ("torch", dtype), ("torch", torch.float64)):
        module = common.get_attention(name, nb_features=64, seed=0, attn_fn=attn_fn).cuda()
        ins = [t.to(cast).requires_grad_() for t in (x.q, x.k, x.v)]
        out = module(*ins, causal=causal)
        assert out.dtype == cast
        results[(attn_fn, cast)] = (out, *torch.autograd.grad(out, ins, grad_out.to(cast)))
    exact = results[("torch", torch.float64)]
    for fla, own, ref in zip(results[("fla", dtype)], results[("torch", dtype)], exact):
        assert _relative(fla, ref) <= 2 * _relative(own, ref) + ulp


@pytest.mark.skipif(not HAS_TRITON, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,m", [((2, 3, 37, 16), 20), ((1, 2, 1000, 64), 64), ((1, 1, 130, 7), 130)])
def test_cuda_triton_features_equal_the_reference(dtype, shape, m):
    """The fused feature map against ``common.random_features.positive_random_features``: features, offsets and
    gradients, for the three offsets (row, global, a carried tensor). Both round the features once at the store
    (bfloat16: relative 2^-9), so 2^-8 bounds bfloat16 and 1e-5 float32. The logits, hence the offsets c (largest
    logits), differ by the product x W'^T (W' = sqrt(S) W): float32 inputs use IEEE dots; bfloat16 inputs multiply
    W' split into two bfloat16 halves, which represent it to 2^-18 relative, so with float32 accumulation
    |c - c_ref| <= 2^-16 max_i sum_d |x_id| |W'_fd|. (A relative bound of 1e-6 on c failed on the H100 for the three
    bfloat16 cases, tracebacks not kept; Triton's interpreter on the CPU, with the GPU's rounding emulated, gives
    relative differences of 3e-6 to 5e-6 there, absolute up to 5.6e-5 against bounds of 1.9e-4 to 8e-4.)"""
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    w = random_matrix("simplex", m, shape[-1], generator=torch.Generator().manual_seed(0)).cuda()
    x = (2 * torch.randn(*shape, device="cuda")).to(dtype).requires_grad_()
    logit_bound = 2.0 ** -16 * (x.detach().float().abs() @ (w.abs() * 0.125 ** 0.5).T).max().item()
    for offset in ("row", "global", torch.full((*shape[:-2], 1, 1), 3.0, device="cuda")):
        ref, ref_c = positive_random_features(x, w, 0.125, offset)
        out, c = fused_positive_random_features(x, w, 0.125, offset)
        assert out.dtype == ref.dtype == dtype and c.shape == ref_c.shape
        assert _relative(out, ref) < tol and (c - ref_c).abs().max().item() <= logit_bound
        g = torch.rand_like(ref)
        assert _relative(torch.autograd.grad((out * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0]) < tol


@pytest.mark.skipif(not (HAS_FLA and HAS_TRITON), reason="needs a CUDA device, Triton and fla-core")
def test_cuda_gpu_check_runs_every_variant(tmp_path):
    rows = gpu_check.run([256], device="cuda", repeats=1, time_budget_s=60)
    assert all("time_ms" in r and r["time_ms"] > 0 for r in rows), [r.get("note") for r in rows if "note" in r]
    torch_path = {(r["mask"], r["pass"]) for r in rows if r.get("rel_diff_vs_torch_path") == 0.0}
    assert ("causal", "fwd") in torch_path  # the torch path against itself; the others differ by rounding only
    assert all(r["rel_diff_vs_torch_path"] < 2e-2 for r in rows if r.get("rel_diff_vs_torch_path") is not None)
