"""common.random_features: projections (simplex geometry, chi norms, orthogonal blocks, N(0, I) marginals) and
Performer's closed-form variance (Lemma 2)."""
import math

import pytest
import torch

from common.random_features import (favor_relative_variance, gaussian_random_matrix, haar_orthogonal,
                                    orthogonal_random_matrix, random_matrix, simplex_directions, simplex_random_matrix)

gen = lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("d", [2, 5, 7, 16])
def test_simplex_block_gram_matrix_and_centring(d):
    """Within a block the unit directions have Gram matrix (d I - 1 1^T) / (d - 1) (cosine -1/(d-1)) and sum
    to zero: a regular simplex, for any d, not only powers of two."""
    w = simplex_random_matrix(3 * d, d, generator=gen(d), dtype=torch.float64)
    expected = (d * torch.eye(d, dtype=torch.float64) - 1) / (d - 1)
    for block in w.view(3, d, d):
        u = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(u @ u.T, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(u.sum(0), torch.zeros(d, dtype=torch.float64), atol=1e-12, rtol=0)
    base = simplex_directions(d)
    torch.testing.assert_close(base @ base.T, expected, atol=1e-12, rtol=0)


def test_orthogonal_blocks_and_haar_matrices():
    d = 6
    w = orthogonal_random_matrix(2 * d + 3, d, generator=gen(), dtype=torch.float64)
    assert w.shape == (15, 6)
    for block in (w[:6], w[6:12], w[12:]):
        gram = block @ block.T
        torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros_like(gram), atol=1e-12, rtol=0)
    q = haar_orthogonal(d, gen(), count=4)
    torch.testing.assert_close(q @ q.transpose(-2, -1), torch.eye(d, dtype=torch.float64).expand(4, d, d),
                               atol=1e-12, rtol=0)
    # different blocks are independent draws, not copies
    assert (w[:6] @ w[6:12].T).abs().max() > 1e-3


@pytest.mark.parametrize("feature_type", ["simplex", "orthogonal", "iid"])
def test_chi_norm_moments_and_gaussian_marginals(feature_type):
    """Row norms ~ chi_d: E|w|^2 = d and E|w|^4 = d(d + 2); each row is N(0, I_d): mean 0, covariance I.
    Tolerances are 5 standard errors of the 24,000-row sample."""
    d, n = 6, 24000
    w = random_matrix(feature_type, n, d, generator=gen(1), dtype=torch.float64)
    sq = (w * w).sum(1)
    for moment, exact in ((sq, d), (sq ** 2, d * (d + 2))):
        assert abs(moment.mean().item() - exact) < 5 * moment.std().item() / math.sqrt(n)
    first_rows = w.view(-1, d, d)[:, 0] if feature_type != "iid" else w  # one row per block: independent
    m = first_rows.shape[0]
    assert (first_rows.mean(0).abs() < 5 / math.sqrt(m)).all()
    cov = first_rows.T @ first_rows / m
    assert (cov - torch.eye(d, dtype=torch.float64)).abs().max() < 5 * math.sqrt(2 / m)


def test_fixed_norm_option_and_edge_cases():
    w = simplex_random_matrix(10, 5, generator=gen(), norm="fixed", dtype=torch.float64)
    torch.testing.assert_close(w.norm(dim=1), torch.full((10,), math.sqrt(5), dtype=torch.float64))
    assert gaussian_random_matrix(3, 1, generator=gen()).shape == (3, 1)
    assert simplex_random_matrix(2, 1, generator=gen()).shape == (2, 1)
    assert random_matrix("simplex", 4, 3).dtype == torch.float32
    a = random_matrix("simplex", 8, 4, generator=gen(3))
    assert torch.equal(a, random_matrix("simplex", 8, 4, generator=gen(3)))  # a seeded draw repeats


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="nb_features must be an int >= 1"):
        simplex_random_matrix(0, 4)
    with pytest.raises(ValueError, match="head_dim must be an int >= 1"):
        orthogonal_random_matrix(4, 0)
    with pytest.raises(ValueError, match="unknown norm"):
        gaussian_random_matrix(4, 4, norm="unit")
    with pytest.raises(ValueError, match="unknown feature_type"):
        random_matrix("sobol", 4, 4)


def test_favor_relative_variance_lemma2_float_and_tensor():
    """(exp(|x + y|^2) - 1) / m: the float and tensor forms agree, and a Monte Carlo variance of m = 1 iid feature
    (200,000 draws, |x + y|^2 = 0.5) is within 5 standard errors of it (the fourth moment is finite there)."""
    assert favor_relative_variance(0.0, 4) == 0.0
    assert favor_relative_variance(1.0, 2) == pytest.approx(math.expm1(1.0) / 2, rel=1e-15)
    t = favor_relative_variance(torch.tensor([0.0, 1.0], dtype=torch.float64), 2)
    torch.testing.assert_close(t, torch.tensor([0.0, math.expm1(1.0) / 2], dtype=torch.float64))
    x = torch.tensor([0.5, 0.0], dtype=torch.float64)
    y = torch.tensor([0.0, 0.5], dtype=torch.float64)
    w = gaussian_random_matrix(200000, 2, generator=gen(5), dtype=torch.float64)
    ratio = torch.exp(w @ (x + y) - 0.5 * (x @ x + y @ y)) / torch.exp(x @ y)   # K^ / K per draw, m = 1
    stderr = ((ratio - 1) ** 2).std().item() / math.sqrt(w.shape[0])
    assert abs(((ratio - 1) ** 2).mean().item() - favor_relative_variance(((x + y) ** 2).sum().item(), 1)) < 5 * stderr
    with pytest.raises(ValueError, match="favor_relative_variance: nb_features"):
        favor_relative_variance(1.0, 0)
