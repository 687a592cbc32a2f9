"""Issue 13, "every method runs causal at n = 262,144 on one 80 GB GPU": the working memory of kdeformer, reformer,
sblocal, uniform and tree grows like n (D + Dv), not like n times the budget.

Each of these methods works through its queries in blocks whose intermediates (gathered keys and values, masks,
logits, features, buds' sums) take about its module's ``BLOCK_BYTES``. Here that constant is made tiny (4 MiB), so
the blocks are several at n and 2n (n = 1024; 256 for the slower tree), and the peak of the live tensors (every
tensor an operator returns, counted until it is freed: :class:`LiveBytes`) must grow by at most a few vectors of
length D + Dv per query and head from n to 2n. Before the blocks existed it grew by one budget-sized row of a mask
or of gathered keys per query: kdeformer's causal mask was (n, C + K + ~2m) and its prefix-count table (n / C, n);
uniform gathered n m (D + Dv) values; sblocal held n m features; reformer n (2 bucket) logits; tree
B H 4096 (T + P) (D + Dv) buds' sums.
"""
import importlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import common
from common.data import synthetic_qkv


class LiveBytes(TorchDispatchMode):
    """The peak, over the run, of the bytes of the storages that the operators called under it returned and that
    are still referenced (a storage is counted once however many views of it exist)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [live tensors on it, bytes]
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                key = t.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = [0, t.untyped_storage().nbytes()]
                    self.now += self.live[key][1]
                    self.peak = max(self.peak, self.now)
                self.live[key][0] += 1
                weakref.finalize(t, self._release, key)
        return out


def peak_live_bytes(fn) -> int:
    with torch.no_grad(), LiveBytes() as mode:
        fn()
    return mode.peak


def test_live_bytes_counts_a_tensor_once_and_frees_it():
    def work():
        a = torch.ones(1000)            # 4000 bytes
        views = [a[:10], a.view(10, 100)]  # views: no new storage
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes, alive with a: peak 8000
        del a, b, views
        torch.ones(1000)                # a and b freed: the peak stays 8000
    assert peak_live_bytes(work) == 8000


SLOW = pytest.mark.slow
BLOCKED = [  # (name, its module, options with budgets far above D so that a budget-sized row shows, n, marks)
    pytest.param("kdeformer", "kdeformer.kdeformer", dict(bucket_size=32, sample_size=256, chunk_size=32), 1024,
                 marks=SLOW, id="kdeformer"),
    pytest.param("reformer", "kdeformer.reformer", dict(bucket_size=256), 1024, id="reformer"),
    pytest.param("sblocal", "kdeformer.scatterbrain", dict(local_size=128, nb_features=256), 1024, id="sblocal"),
    pytest.param("uniform", "common.baselines", dict(num_samples=256), 1024, id="uniform"),
    pytest.param("tree", "tree_attention.np_attention", dict(number_of_terms_exponent=0.6, parallelism=8), 256,
                 marks=SLOW, id="tree"),
]


@pytest.mark.parametrize("name,module,options,n", BLOCKED)
def test_causal_working_memory_grows_like_n_times_d_not_like_n_times_the_budget(name, module, options, n,
                                                                                 monkeypatch):
    monkeypatch.setattr(importlib.import_module(module), "BLOCK_BYTES", 2 ** 22)
    heads, d = 2, 16
    peak = {}
    for length in (n, 2 * n):
        x = synthetic_qkv("clustered", 1, heads, length, length, d, seed=0)
        attn = common.get_attention(name, seed=0, **options)
        peak[length] = peak_live_bytes(lambda: attn(x.q, x.k, x.v, causal=True))
    per_query_and_head = (peak[2 * n] - peak[n]) / n / heads
    # q, k, v, the output and their float32 / blocked / sorted copies, long indices: a few (D + Dv) float32 rows
    # (before the blocks: 7-40 KB here, 9-80x this bound)
    assert per_query_and_head <= 12 * (2 * d) * 4, (name, peak)


SAME_DRAWS = [  # the methods whose blocks leave the random draws as they are (tree's blocks draw their own:
    # tests/tree_attention, test_query_blocks_change_only_the_random_stream)
    ("kdeformer", "kdeformer.kdeformer", dict(bucket_size=16, sample_size=64, chunk_size=16)),
    ("reformer", "kdeformer.reformer", dict(bucket_size=16, n_hashes=2)),
    ("sblocal", "kdeformer.scatterbrain", dict(local_size=16, nb_features=32)),
    ("uniform", "common.baselines", dict(num_samples=32)),
]


@pytest.mark.parametrize("name,module,options", SAME_DRAWS, ids=[s[0] for s in SAME_DRAWS])
@pytest.mark.parametrize("causal", [False, True])
def test_blocks_change_no_output(name, module, options, causal, monkeypatch):
    # many small blocks (64 KiB) against one block, float64; and at scores ~1e3 in float32 (sblocal's key offset is
    # carried from block to block there) finite and equal to the one-block call
    x = synthetic_qkv("clustered", 2, 2, 300, 300, 8, dtype=torch.float64, seed=1)
    for scale, dtype, tol in ((1.0, torch.float64, 1e-12), (12.0, torch.float32, 1e-5)):
        q, k, v = (t.to(dtype) for t in (x.q * scale, x.k * scale, x.v))
        one = common.get_attention(name, seed=0, **options)(q, k, v, causal=causal)
        monkeypatch.setattr(importlib.import_module(module), "BLOCK_BYTES", 2 ** 16)
        blocks = common.get_attention(name, seed=0, **options)(q, k, v, causal=causal)
        monkeypatch.undo()
        assert torch.isfinite(blocks).all()
        torch.testing.assert_close(blocks, one, rtol=tol, atol=tol)
