import math

import pytest
import torch

from common import metrics


def test_frobenius_and_max_abs_known_values():
    exact = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    approx = exact + torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    assert metrics.relative_frobenius_error(approx, exact) == pytest.approx(1 / 5)
    assert metrics.max_abs_error(approx, exact) == pytest.approx(1.0)
    assert metrics.relative_frobenius_error(exact, exact) == 0.0


def test_spectral_error_known_value_and_batch_mean():
    exact = torch.diag(torch.tensor([2.0, 1.0]))
    approx = torch.diag(torch.tensor([2.0, 1.5]))  # difference diag(0, .5): norm .5, exact norm 2
    assert metrics.relative_spectral_error(approx, exact) == pytest.approx(0.25)
    both = torch.stack([exact, exact]), torch.stack([approx, exact])
    assert metrics.relative_spectral_error(both[1], both[0]) == pytest.approx(0.125)


def test_kl_rows():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.75, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert metrics.kl_divergence_rows(p, q) == pytest.approx(expected)
    assert metrics.kl_divergence_rows(p, p) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_divergence_rows(p, torch.tensor([[1.0, 0.0, 0.0]])) > 10  # missed key: large, finite


def test_perplexity_and_errors():
    assert metrics.perplexity(math.log(7.0)) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="loss must be finite"):
        metrics.perplexity(float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        metrics.relative_frobenius_error(torch.zeros(2, 2), torch.zeros(2, 3))
