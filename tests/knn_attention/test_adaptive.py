"""The adaptive estimator (issue 16): per row, as many top keys exactly as the index's scores say are needed, the
rest sampled; never worse than plain top-k at the same k on concentrated rows, unbiased on flat ones."""
import pytest
import torch

import common
from common.data import synthetic_qkv
from common.metrics import relative_frobenius_error


def _mean_error(x, seeds, causal=False, **options):
    exact = common.softmax_attention(x.q, x.k, x.v, causal=causal)
    return sum(relative_frobenius_error(common.get_attention("knn", seed=s, **options)(x.q, x.k, x.v, causal=causal),
                                        exact) for s in range(seeds)) / seeds


def test_adaptive_never_worse_than_topk_on_concentrated_inputs():
    inputs = {
        # the case: each row's mass spread over a cluster of 64 keys, k = sqrt(n) = 16 < 64
        "cluster_of_64": synthetic_qkv("clustered", 1, 2, 64, 256, 16, n_clusters=4, sharpness=2.0, seed=0,
                                       dtype=torch.float64),
        # the efficiency script's clustered_concentrated input (n / 64 clusters, sharpness 2)
        "concentrated": synthetic_qkv("clustered", 1, 2, 64, 1024, 16, n_clusters=16, sharpness=2.0, seed=1,
                                      dtype=torch.float64),
    }
    for name, x in inputs.items():
        for causal in (False, True):
            topk = _mean_error(x, 1, causal, k=16, estimator="topk")
            adaptive = _mean_error(x, 8, causal, k=16, num_samples=16, estimator="adaptive")
            uniform_tail = _mean_error(x, 8, causal, k=16, num_samples=16, estimator="topk_uniform_tail")
            assert adaptive <= topk, (name, causal, adaptive, topk)
            assert adaptive < uniform_tail, (name, causal, adaptive, uniform_tail)


@pytest.mark.slow
def test_adaptive_unbiased_on_flat_rows():
    # q = 0: every score equal, no prefix meets the bound, every row samples its tail: D is deterministic and N
    # unbiased, so the output is unbiased. One run's sd is (30/50) sd(v) / sqrt(5) <= 0.6 * 1.3 / 2.2 = 0.35;
    # the mean of 400 runs has sd <= 0.018, and 0.08 is 4.5 of those.
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 1, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = torch.stack([common.get_attention("knn", k=5, k_max=20, num_samples=5, estimator="adaptive", seed=s)(q, k, v)
                        for s in range(400)])
    torch.testing.assert_close(runs.mean(0), v.mean(2, keepdim=True).expand(1, 1, 3, 2), atol=0.08, rtol=0)


@pytest.mark.slow
def test_adaptive_unbiased_mean_over_seeds_on_gaussian_rows():
    x = synthetic_qkv("gaussian", 1, 2, 16, 64, 8, sharpness=1.5, dtype=torch.float64)
    exact = common.softmax_attention(x.q, x.k, x.v)
    runs = torch.stack([common.get_attention("knn", k=8, num_samples=8, estimator="adaptive", seed=s)(x.q, x.k, x.v)
                        for s in range(300)])
    single = (runs[0] - exact).abs().mean().item()
    mean_err = (runs.mean(0) - exact).abs().mean().item()
    assert mean_err < 0.2 * single + 1e-12 and mean_err < 0.05
