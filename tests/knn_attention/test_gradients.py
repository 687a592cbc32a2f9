"""Hand-written and sampled gradients against autograd of exact attention (float64)."""
import pytest
import torch

import common
from common.data import synthetic_qkv
from knn_attention.backward_pass import sampled_gradients
from knn_attention.naive_backprop import naive_attention_gradients
from knn_attention.softmax_expectation import lazy_gumbel_sample, retrieved_set
from knn_attention.index import IndexOptions, top_k_indices
from common.attention import allowed_key_counts


def _autograd(x, grad_out, causal):
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    common.softmax_attention(q, k, v, causal=causal).backward(grad_out)
    return q.grad, k.grad, v.grad


def test_naive_backprop_equals_autograd():
    x = synthetic_qkv("gaussian", 2, 2, 7, 9, 4, value_dim=3, dtype=torch.float64)
    g = torch.randn(2, 2, 7, 3, dtype=torch.float64)
    for causal in (False, True):
        for mine, ref in zip(naive_attention_gradients(x.q, x.k, x.v, g, causal=causal), _autograd(x, g, causal)):
            torch.testing.assert_close(mine, ref)


def test_sampled_gradients_mean_matches_autograd():
    x = synthetic_qkv("gaussian", 1, 1, 6, 20, 4, value_dim=3, dtype=torch.float64)
    g = torch.randn(1, 1, 6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = _autograd(x, g, False)
    out = common.softmax_attention(x.q, x.k, x.v)
    top = retrieved_set(x.q, x.k, top_k_indices(x.q, x.k, 5, IndexOptions("torch")),
                        allowed_key_counts(6, 20, False), 0.5)
    samples, _ = lazy_gumbel_sample(x.q, x.k, top, 40000, 0.5, torch.Generator().manual_seed(0))
    for est, exact in zip(sampled_gradients(x.q, x.k, x.v, out, g, samples, 0.5), ref):
        assert (est - exact).abs().max().item() < 0.03 * exact.abs().max().item() + 0.01


@pytest.mark.slow
def test_sampled_gradient_function_end_to_end_and_autograd_path():
    x = synthetic_qkv("gaussian", 1, 2, 10, 10, 4, dtype=torch.float64)
    g = torch.randn(1, 2, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # not the global stream
    ref = _autograd(x, g, True)
    means = [torch.zeros_like(t) for t in ref]
    runs = 300
    for s in range(runs):
        q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
        common.get_attention("knn", k=10, num_samples=10, gradient="sampled", seed=s)(q, k, v, causal=True).backward(g)
        for m, t in zip(means, (q, k, v)):
            m += t.grad / runs
    for m, r in zip(means, ref):
        assert (m - r).abs().max().item() < 0.05 * r.abs().max().item() + 0.02
    # with k = n the autograd path is the exact gradient
    q, k, v = (t.clone().requires_grad_() for t in (x.q, x.k, x.v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: common.get_attention("knn", k=10, estimator="topk")(a, b, c, causal=True), (q, k, v))
    common.get_attention("knn", k=10, estimator="topk")(q, k, v, causal=True).backward(g)
    for t, r in zip((q, k, v), ref):
        torch.testing.assert_close(t.grad, r)


def _sampled_dv_runs(x, g, dv_estimator, runs, causal):
    out = []
    for s in range(runs):
        v = x.v.clone().requires_grad_()
        common.get_attention("knn", k=3, num_samples=4, gradient="sampled", estimator="topk", index="torch",
                             dv_estimator=dv_estimator, seed=s)(x.q, x.k, v, causal=causal).backward(g)
        out.append(v.grad)
    return torch.stack(out)


@pytest.mark.slow
def test_random_walk_dv_unbiased_like_scatter():
    # dV = A^T G by the paper's one-step walks (signed G: shift, walk, subtract the shift term) through the knn
    # module, causal (the harder case: own-block keys, rows of different lengths). For an unbiased estimator the
    # mean of R runs has E||mean - ref||^2 = sum_c Var_c / R; over the 48 coordinates that sum concentrates (a
    # chi-square-like total), so ||mean - ref||^2 <= 2 sum_c se_c^2 (se from the runs) holds unless there is a bias
    # of about the size of the noise; the scatter estimator is held to the same test.
    x = synthetic_qkv("gaussian", 1, 2, 8, 8, 4, value_dim=3, dtype=torch.float64, seed=2)
    g = torch.randn(1, 2, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = _autograd(x, g, True)[2]
    for est in ("walk", "scatter"):
        runs = _sampled_dv_runs(x, g, est, 200, True)
        se2 = runs.var(0) / 200
        assert ((runs.mean(0) - ref) ** 2).sum() <= 2 * se2.sum(), est
