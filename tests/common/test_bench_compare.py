import torch

import common
from common import bench, compare
from common.data import synthetic_qkv


def test_time_callable_median_of_repeats():
    calls = []
    t = bench.time_callable(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times_s) == 5 and min(t.times_s) <= t.median_s <= max(t.times_s)


def test_peak_memory_sees_a_large_allocation():
    result, mem = bench.peak_memory_bytes(lambda: torch.ones(64 * 2 ** 20 // 4).sum())
    assert result.item() == 64 * 2 ** 20 // 4
    assert mem is None or mem >= 32 * 2 ** 20


def test_evaluate_methods_exact_first_and_zero_error():
    x = synthetic_qkv("gaussian", 1, 2, 64, 64, 8)
    rows = bench.evaluate_methods([("uniform", {"num_samples": 64, "seed": 0})], x.q, x.k, x.v, repeats=1)
    assert [r["method"] for r in rows] == ["exact", "uniform"]
    assert rows[0]["rel_fro"] == 0.0 and rows[0]["ratio_to_exact"] == 1.0
    assert rows[1]["ratio_to_exact"] > 0 and rows[1]["rel_fro"] > 0


def test_compare_grid_every_method_appears(tmp_path):
    rows = compare.main(["--quick", "--heads", "1", "--head-dim", "8", "--out", str(tmp_path)])
    methods = {r["method"] for r in rows}
    assert methods == set(common.available())
    for r in rows:
        assert r["ratio_to_exact"] > 0
        if r["method"] == "exact":
            assert r["rel_fro"] == 0.0
    assert (tmp_path / "compare.csv").read_text().startswith("input,n,causal")
    assert (tmp_path / "compare_pareto.png").stat().st_size > 1000
