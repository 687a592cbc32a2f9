"""Issue 17 for knn: budgets larger than the keys clamp (warned once), half precision, large scores, odd shapes
(``exact_options`` and the estimators it runs are held to tests/contract)."""
import warnings

import pytest
import torch

import common


def _qkv(b, h, nq, nk, d, dv, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(b, h, n, d, generator=g) for n in (nq, nk))
    return q.to(dtype), k.to(dtype), torch.randn(b, h, nk, dv, generator=g).to(dtype)


def test_decoding_prompt_shorter_than_k_clamps_and_warns_once():
    # issue 17 item 4: nanoGPT sampling with attention_options={'k': 8} after a 6-token prompt raised
    # "k=8 is larger than the number of keys Nk=6"; now k (and num_samples) clamp to the keys available
    q, k, v = _qkv(1, 2, 6, 6, 8, 8, torch.float64)
    attn = common.get_attention("knn", k=8, num_samples=8, estimator="topk", seed=0)
    with pytest.warns(UserWarning, match="k=8 is larger than the number of keys Nk=6"):
        out = attn(q, k, v, causal=True)
    # clamped to k = Nk, estimator (a) is exact attention
    torch.testing.assert_close(out, common.softmax_attention(q, k, v, causal=True))
    state = attn.init_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # second and later clamps of the same instance stay silent
        for t in range(6):
            step_out = attn.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
            torch.testing.assert_close(step_out, out[:, :, t:t + 1])


@pytest.mark.parametrize("estimator", ["topk_uniform_tail", "gumbel"])
def test_more_samples_than_keys_is_valid_and_silent(estimator):
    # samples are drawn with replacement: l > Nk is a valid budget (no clamp, no warning) and stays unbiased
    q, k, v = _qkv(1, 1, 3, 3, 4, 4, torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = common.get_attention("knn", k=1, num_samples=4000, estimator=estimator, seed=0)(q, k, v)
    # one run of 4000 draws: each output within 5 standard errors (sd <= max|v|) of exact
    bound = 5 * v.abs().max() / 4000 ** 0.5
    assert (out - common.softmax_attention(q, k, v)).abs().max() < bound


SHAPES = [(1, 1, 1, 1, 4, 4), (1, 2, 2, 2, 4, 4), (2, 2, 7, 7, 8, 8), (1, 2, 1, 9, 8, 8), (1, 2, 5, 13, 8, 8),
          (1, 1, 6, 6, 1, 1), (1, 1, 9, 9, 128, 128), (1, 2, 9, 9, 8, 3)]


# the reliability matrix (tests/contract) runs knn's default (adaptive) and gumbel; here the two it does not run
@pytest.mark.parametrize("estimator", ["topk", "topk_uniform_tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtype_shape_and_large_scores(estimator, dtype):
    # scores up to about 1e4 (q, k scaled by 100 at D = 8: |s| ~ 1e4 / sqrt(8) * |N(0,1) . N(0,1)|) overflowed
    # float16 before the float32 upcast; every output must be finite, of the input's dtype and shape
    for b, h, nq, nk, d, dv in SHAPES:
        for causal in (False, True):
            for scale in (1.0, 100.0):
                q, k, v = _qkv(b, h, nq, nk, d, dv, dtype, scale)
                q = q.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous query
                out = common.get_attention("knn", estimator=estimator, seed=0)(q, k, v, causal=causal)
                assert out.dtype == dtype and out.shape == (b, h, nq, dv)
                assert torch.isfinite(out).all(), (b, h, nq, nk, d, dv, causal, scale)
                if scale > 1:  # rows this peaked are one-hot: every estimator returns the argmax key's value
                    ref = common.softmax_attention(q.double(), k.double(), v.double(), causal=causal)
                    assert (out.double() - ref).abs().max() < 0.02 * (1 + v.double().abs().max())


def test_half_precision_within_float32_error():
    q, k, v = _qkv(1, 2, 32, 32, 16, 16, torch.float32)
    ref = common.get_attention("knn", estimator="topk", k=6)(q, k, v)
    for dtype, eps in ((torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)):
        out = common.get_attention("knn", estimator="topk", k=6)(q.to(dtype), k.to(dtype), v.to(dtype))
        # inputs rounded to dtype (relative eps) move scores by about eps |q| |k| / sqrt(D) and the outputs by a
        # few eps max|v|; the top sets agree here, so the difference is rounding only
        assert (out.float() - ref).abs().max() < 8 * eps * v.abs().max()
