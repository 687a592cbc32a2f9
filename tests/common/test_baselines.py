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


def test_uniform_seeded_repeats_and_uniform_scores_are_exact_in_mean():
    x = synthetic_qkv("gaussian", 1, 1, 8, 8, 4)
    a = common.get_attention("uniform", num_samples=4, seed=3)(x.q, x.k, x.v)
    b = common.get_attention("uniform", num_samples=4, seed=3)(x.q, x.k, x.v)
    assert torch.equal(a, b)
    # with zero queries every score is equal: the estimate is a mean of sampled values, unbiased for mean(v)
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    v = torch.randn(1, 1, 16, 3, dtype=torch.float64)
    k = torch.randn(1, 1, 16, 4, dtype=torch.float64)
    attn = common.get_attention("uniform", num_samples=1, seed=0)
    mean = torch.stack([attn(q, k, v) for _ in range(4000)]).mean(0)
    assert (mean - v.mean(2, keepdim=True)).abs().max() < 4 * v.std() / 4000 ** 0.5 + 1e-9


def test_uniform_causal_never_reads_future_keys():
    x = synthetic_qkv("gaussian", 1, 2, 12, 12, 4, dtype=torch.float64)
    out = common.get_attention("uniform", num_samples=5, seed=1)(x.q, x.k, x.v, causal=True)
    k2, v2 = x.k.clone(), x.v.clone()
    k2[:, :, 7:] = 1e3
    v2[:, :, 7:] = -1e3
    out2 = common.get_attention("uniform", num_samples=5, seed=1)(x.q, k2, v2, causal=True)
    torch.testing.assert_close(out[:, :, :7], out2[:, :, :7])
    first = common.get_attention("uniform", num_samples=5, seed=1)(x.q, x.k, x.v, causal=True)[:, :, 0]
    torch.testing.assert_close(first, x.v[:, :, 0])
