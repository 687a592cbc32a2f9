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


def test_transpose_walk_estimate_unbiased_for_signed_x():
    # P^T x with x of both signs: the mean of 400 independent estimates lies within 4.5 standard errors of the
    # mean (estimated from the 400 runs) of the exact product, coordinate by coordinate
    from knn_attention.random_walk import transpose_walk_estimate

    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 6, 5, generator=g, dtype=torch.float64) ** 3
    p = p / p.sum(-1, keepdim=True)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64) + torch.tensor([0.0, -2.0, 2.0], dtype=torch.float64)
    exact = p.transpose(1, 2) @ x

    def sample_rows(rows, gen):
        probs = torch.stack([p[b, rows[b]] for b in range(2)])
        return torch.multinomial(probs.view(-1, 5), 1, generator=gen).view(rows.shape)

    gen = torch.Generator().manual_seed(1)
    runs = torch.stack([transpose_walk_estimate(sample_rows, x, 5, 50, gen) for _ in range(400)])
    se = runs.std(0) / 400 ** 0.5
    assert ((runs.mean(0) - exact).abs() < 4.5 * se + 1e-12).all()
    assert not ((runs[0] - exact).abs() < 1e-9).all()  # one run is a noisy estimate, not the exact product
