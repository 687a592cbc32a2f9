import pytest
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
    rows = compare.main(["--n", "64", "128", "--repeats", "1", "--inputs", "gaussian", "clustered", "--heads", "1",
                         "--head-dim", "8", "--out", str(tmp_path), "--no-progress"])
    methods = {r["method"] for r in rows}
    assert methods == set(common.available())
    for r in rows:
        assert r["ratio_to_exact"] > 0
        if r["method"] == "exact":
            assert r["rel_fro"] == 0.0
    assert (tmp_path / "compare.csv").read_text().startswith("input,n,causal")
    assert {(r["n"], r["causal"]) for r in rows} == {(64, False), (64, True), (128, False), (128, True)}
    assert (tmp_path / "compare_pareto.png").stat().st_size > 1000
    merged = compare.main(["--from_csv", str(tmp_path / "compare.csv"), "--out", str(tmp_path / "again")])
    assert merged == compare.read_csv([tmp_path / "compare.csv"])
    assert [(r["method"], r["n"], r["causal"], r["options"], r["rel_fro"]) for r in merged] == \
        [(r["method"], r["n"], r["causal"], {**r["options"]}, r["rel_fro"]) for r in rows]
    assert (tmp_path / "compare_scaling.png").stat().st_size > 1000


def test_compare_glove_input_and_bad_arguments(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("".join(f"w{i} " + " ".join(str((i * 7 + j) % 5 - 2) for j in range(4)) + "\n" for i in range(40)))
    x = compare.make_input("glove", 16, heads=1, head_dim=4, seed=0, glove=f, dtype=torch.float32, device="cpu")
    assert x.q.shape == (1, 1, 16, 4) and torch.equal(x.q, x.k) and not torch.equal(x.k, x.v)
    with pytest.raises(ValueError, match="need 2n = 64"):
        compare.make_input("glove", 32, heads=1, head_dim=4, seed=0, glove=f, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs --glove PATH"):
        compare.make_input("glove", 16, heads=1, head_dim=4, seed=0, glove=None, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="unknown method"):
        compare.comparison_grid(["gaussian"], [64], [False], ["nope"])
