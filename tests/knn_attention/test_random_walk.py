import pytest
import torch

from common.attention import attention_weights
from knn_attention.random_walk import attention_step, matrix_step, random_walk_estimate


def test_random_walk_converges_to_matrix_power_product():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(5, 5, generator=g, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True)
    x = torch.randn(5, generator=g, dtype=torch.float64)
    exact = torch.linalg.matrix_power(p, 3) @ x
    errs = []
    for walks in (100, 10000):
        est, se = random_walk_estimate(matrix_step(p), x, torch.arange(5), 3, walks, torch.Generator().manual_seed(1))
        assert ((est - exact).abs() < 4.5 * se + 1e-12).all()
        errs.append((est - exact).abs().max().item())
    assert errs[1] < errs[0]


def test_random_walk_on_attention_matrix_with_lazy_gumbel_steps():
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(32, 8, generator=g, dtype=torch.float64) * 1.5
    f = torch.randn(32, generator=g, dtype=torch.float64)
    a = attention_weights(xs.view(1, 1, 32, 8), xs.view(1, 1, 32, 8))[0, 0]
    exact = a @ (a @ f)
    est, se = random_walk_estimate(attention_step(xs, top_k=6), f, torch.arange(8), 2, 4000,
                                   torch.Generator().manual_seed(0))
    assert ((est - exact[:8]).abs() < 4.5 * se).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="row-stochastic"):
        matrix_step(torch.ones(3, 3))
    with pytest.raises(ValueError, match="walks must be >= 1"):
        random_walk_estimate(matrix_step(torch.eye(2)), torch.ones(2), torch.arange(2), 1, 0, torch.Generator())
