"""The seed repository's README usage (issue 16): ``from srf_attention import FastAttention, simplex_random_matrix``
and the calls of its usage block, with its arguments, run here.

Where the seed's block is not runnable Python the test makes the smallest change, each named: its prefill and
generation lines lack the module (``o, ... = (q=q, ...)``), so they call ``attn(...)``; the generation step passes
the new token's k and v (the block passes only q and overwrites ``denominator`` with an empty tensor of another
shape, which no state-based decoder can read); its placeholders are ``torch.empty`` (uninitialised memory, which
may hold NaN and is refused), so they are ``torch.randn``; and ``attn_fn='flash'`` needs CUDA and Triton, so on
the CPU the test checks that it is refused naming ``attn_fn='torch'``. The sequence is L = 64 instead of 1024, so
that the token-by-token prefill stays a fraction of a second.
"""
import importlib.util

import pytest
import torch

HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def test_seed_readme_usage_runs():
    from srf_attention import FastAttention, simplex_random_matrix

    device = "cuda" if HAS_GPU else "cpu"
    B, H, L, D = (1, 8, 64, 128)
    srfs = simplex_random_matrix(nb_rows=D, nb_features=D, normalize=False, device=device)
    assert srfs.shape == (D, D)
    u = srfs / srfs.norm(dim=1, keepdim=True)   # one simplex block: pairwise cosine -1/(D-1)
    torch.testing.assert_close(u @ u.T, (D * torch.eye(D, device=device) - 1) / (D - 1), atol=1e-5, rtol=0)
    unit = simplex_random_matrix(nb_rows=D, nb_features=D, normalize=True, device=device)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(D, device=device))

    attn = FastAttention(head_dim=D, nb_features=D, causal=True).to(device)
    attn.redraw_on_call_(True)
    torch.manual_seed(0)
    q, k, v = [torch.randn(B, H, L, D, device=device) for _ in range(3)]
    o = attn(q=q, k=k, v=v, mode='train', attn_fn='torch')
    assert o.shape == (B, H, L, D) and torch.isfinite(o).all()
    if HAS_GPU:
        o = attn(q=q, k=k, v=v, mode='train', attn_fn='flash')
        assert o.shape == (B, H, L, D)
    else:
        with pytest.raises(RuntimeError, match="use attn_fn='torch'"):
            attn(q=q, k=k, v=v, mode='train', attn_fn='flash')

    attn.redraw_on_call_(False)
    prefills = [attn(q=q, k=k, v=v, mode='prefill', attn_fn=fn) for fn in ('parallel', 'chunkwise-recurrent',
                                                                          'recurrent')]
    o, kv, key_maxima, denominator = prefills[0]
    for other in prefills[1:]:   # the three prefill forms agree
        for a, b in zip(prefills[0], other):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    q1, k1, v1 = [torch.randn(B, H, 1, D, device=device) for _ in range(3)]
    o1, kv, key_maxima, denominator = attn(q=q1, k=k1, v=v1, kv=kv, key_maxima=key_maxima, denominator=denominator,
                                           mode='generation')
    assert o1.shape == (B, H, 1, D)
    # the step equals the last row of the causal forward over the prompt and the new token
    whole = attn(q=torch.cat([q, q1], 2), k=torch.cat([k, k1], 2), v=torch.cat([v, v1], 2), mode='train')
    torch.testing.assert_close(o1, whole[:, :, -1:], atol=1e-4, rtol=1e-4)
