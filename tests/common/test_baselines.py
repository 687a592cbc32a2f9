import torch

import common
from common.data import synthetic_qkv
from common.metrics import relative_frobenius_error


def test_uniform_is_consistent_error_falls_with_samples():
    x = synthetic_qkv("gaussian", 1, 2, 64, 256, 16, sharpness=0.5, dtype=torch.float64)
    exact = common.softmax_attention(x.q, x.k, x.v)
    errs = []
    for m in (32, 512, 8192):
        runs = [relative_frobenius_error(common.get_attention("uniform", num_samples=m, seed=s)(x.q, x.k, x.v), exact)
                for s in range(3)]
        errs.append(sum(runs) / len(runs))
    # a Monte Carlo error: 16x the samples divides it by about 4 (1/sqrt(m)); allow 2.5..6
    assert 2.5 < errs[0] / errs[1] < 6 and 2.5 < errs[1] / errs[2] < 6 and errs[2] < 0.3


def test_uniform_scores_are_exact_in_mean():
    # (seed repeat and causality of every method: tests/contract/test_contract.py)
    # with zero queries every score is equal: the estimate is a mean of sampled values, unbiased for mean(v)
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 16, 3, dtype=torch.float64)
    k = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    attn = common.get_attention("uniform", num_samples=1, seed=0)
    mean = torch.stack([attn(q, k, v) for _ in range(4000)]).mean(0)
    assert (mean - v.mean(2, keepdim=True)).abs().max() < 4 * v.std() / 4000 ** 0.5 + 1e-9


def test_uniform_causal_samples_only_the_prefix():
    # query i reads i + 1 keys: with one sample per query, over many draws each prefix key appears and no other
    x = synthetic_qkv("gaussian", 1, 1, 6, 6, 4, dtype=torch.float64)
    v = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1)
    attn = common.get_attention("uniform", num_samples=1, seed=0)
    picked = torch.stack([attn(x.q, x.k, v, causal=True) for _ in range(300)])[..., 0]  # (300, 1, 1, 6)
    for i in range(6):
        assert set(picked[:, 0, 0, i].long().tolist()) == set(range(i + 1))


def test_uniform_half_precision_accumulates_in_float32():
    x = synthetic_qkv("gaussian", 1, 2, 8, 8, 128)
    q, k = x.q * 30, x.k * 30  # |q.k| up to ~1e5: overflows float16 (65504) unless computed in float32
    for dtype in (torch.float16, torch.bfloat16):
        out = common.get_attention("uniform", num_samples=4, seed=1)(q.to(dtype), k.to(dtype), x.v.to(dtype))
        ref = common.get_attention("uniform", num_samples=4, seed=1)(*(t.to(dtype).float() for t in (q, k, x.v)))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2 * torch.finfo(dtype).eps * ref.abs().max().item())
