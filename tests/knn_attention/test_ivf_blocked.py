"""The cell-blocked IVF path (index='ivf_blas'): exact when every cell is probed, unbiased tail, gradients."""
import pytest
import torch

import common
from common.metrics import relative_frobenius_error
from common.data import synthetic_qkv
from knn_attention.ivf_blocked import build_cells
from knn_attention.naive_attention import naive_attention


def test_cells_partition_the_keys():
    k = synthetic_qkv("clustered", 1, 1, 8, 200, 8, dtype=torch.float64).k[0, 0]
    cells = build_cells(k, 12)
    assert sorted(cells.order.tolist()) == list(range(200)) and cells.starts[-1] == 200
    for c in range(12):  # every key of cell c is assigned to c
        assert (cells.cell_of_key[cells.order[cells.starts[c]:cells.starts[c + 1]]] == c).all()


@pytest.mark.parametrize("estimator", ["topk", "topk_uniform_tail"])
def test_all_cells_probed_is_exact(estimator):
    x = synthetic_qkv("gaussian", 2, 2, 40, 56, 8, value_dim=5, dtype=torch.float64)
    out = common.get_attention("knn", index="ivf_blas", nlist=6, nprobe=6, estimator=estimator, seed=0)(x.q, x.k, x.v)
    assert (out - naive_attention(x.q, x.k, x.v)).abs().max().item() < 1e-6


@pytest.mark.slow
def test_tail_estimator_unbiased_mean_over_seeds():
    # one probed cell of eight: most of the mass is in the sampled tail; the mean over 200 seeds of the ratio
    # estimate lands far closer to exact than one run (the tail sums are unbiased, the ratio is consistent)
    x = synthetic_qkv("gaussian", 1, 1, 24, 64, 8, dtype=torch.float64)
    exact = naive_attention(x.q, x.k, x.v)
    runs = torch.stack([common.get_attention("knn", index="ivf_blas", nlist=8, nprobe=1, num_samples=16,
                                             tail_block=5, seed=s)(x.q, x.k, x.v) for s in range(200)])
    single = (runs[0] - exact).abs().mean().item()
    mean_err = (runs.mean(0) - exact).abs().mean().item()
    assert mean_err < 0.2 * single and mean_err < 0.05


def test_concentrated_rows_are_accurate_with_few_probes():
    # queries near the centre of one of 32 tight clusters: the probed cells hold each row's mass
    x = synthetic_qkv("clustered", 1, 1, 512, 512, 64, n_clusters=32, sharpness=2.0, dtype=torch.float64)
    out = common.get_attention("knn", index="ivf_blas", estimator="topk", nprobe=8)(x.q, x.k, x.v)
    assert relative_frobenius_error(out, naive_attention(x.q, x.k, x.v)) < 0.05


@pytest.mark.slow
def test_autograd_through_cells():
    x = synthetic_qkv("gaussian", 1, 1, 9, 12, 3, dtype=torch.float64)
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(lambda a, b, c: common.get_attention(
        "knn", index="ivf_blas", nlist=3, nprobe=2, num_samples=4, seed=0)(a, b, c), (q, k, v))


def test_bad_options():
    x = synthetic_qkv("gaussian", 1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="ivf_blas' is not available with causal=True"):
        common.get_attention("knn", index="ivf_blas")(x.q, x.k, x.v, causal=True)
    with pytest.raises(ValueError, match="set nprobe and nlist instead of k"):
        common.get_attention("knn", index="ivf_blas", k=4)
    with pytest.raises(ValueError, match="needs per-query top-k lists"):
        common.get_attention("knn", index="ivf_blas", estimator="gumbel")
    with pytest.raises(ValueError, match="needs per-query top-k lists"):
        common.get_attention("knn", index="ivf_blas", estimator="adaptive")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        common.get_attention("knn", index="ivf_blas", nprobe=0)
