import csv
import math

import pytest
import torch

import common
from common import bench, compare, plotting
from common.data import InputSpec, synthetic_qkv


def test_time_callable_median_of_repeats():
    calls = []
    t = bench.time_callable(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times_s) == 5 and min(t.times_s) <= t.median_s <= max(t.times_s)


def test_time_callable_repeats_until_min_time_within_the_bound(monkeypatch):
    clock = iter(range(10 ** 6))  # a fake clock: every call takes exactly 1 "second"
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    t = bench.time_callable(lambda: None, warmup=0, repeats=3, min_time_s=10)
    assert t.times_s == [1] * 10 and t.median_s == 1
    monkeypatch.setattr(bench, "MAX_REPEATS", 4)
    assert len(bench.time_callable(lambda: None, warmup=0, repeats=3, min_time_s=10).times_s) == 4
    with pytest.raises(ValueError, match="min_time_s >= 0"):
        bench.time_callable(lambda: None, min_time_s=-1)


def test_peak_memory_sees_a_large_allocation():
    result, mem = bench.peak_memory_bytes(lambda: torch.ones(64 * 2 ** 20 // 4).sum())
    assert result.item() == 64 * 2 ** 20 // 4
    assert mem is None or mem >= 32 * 2 ** 20


def test_evaluate_methods_exact_first_and_zero_error():
    x = synthetic_qkv("gaussian", 1, 2, 64, 64, 8)
    rows = bench.evaluate_methods([("uniform", {"num_samples": 64, "seed": 0})], x.q, x.k, x.v, repeats=1)
    assert [r["method"] for r in rows] == ["exact", "uniform"]
    assert rows[0]["rel_fro"] == 0.0 and rows[0]["ratio_to_exact"] == 1.0 and rows[0]["exact_fp32_time_s"] is None
    assert rows[1]["ratio_to_exact"] > 0 and rows[1]["rel_fro"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_evaluate_methods_half_precision_against_exact_in_the_same_dtype(dtype):
    """The ratio's denominator is exact in the inputs' dtype; the float32 exact time is an extra column; errors
    are to float32 exact, so exact's own row shows only the dtype's rounding."""
    x = synthetic_qkv("clustered", 1, 2, 64, 64, 16, dtype=dtype)
    rows = bench.evaluate_methods([("performer", {"nb_features": 32, "seed": 0})], x.q, x.k, x.v, repeats=1,
                                  time_fp32_exact=True)
    exact, performer = rows
    assert exact["ratio_to_exact"] == 1.0 and exact["exact_fp32_time_s"] > 0
    assert 0 < exact["rel_fro"] < 1e-2  # half-precision rounding of the output, nothing more
    assert performer["exact_fp32_time_s"] == exact["exact_fp32_time_s"]
    assert performer["ratio_to_exact"] == pytest.approx(performer["time_s"] / exact["time_s"])
    assert 0 < performer["rel_fro"] < 5


def test_comparison_grid_follows_the_registry_policy():
    grid = compare.comparison_grid(["gaussian"], [64], [False, True], seed=3)
    for causal in (False, True):
        names = {name for (_, _, c, name, _) in grid if c == causal}
        assert names == set(common.methods(causal=causal)) - {"exact"}
    for (_, n, _, name, options) in grid:
        assert options in common.budget_options(name, n, seed=3)
    with pytest.raises(ValueError, match="unknown method"):
        compare.comparison_grid(["gaussian"], [64], [False], ["nope"])


def test_compare_writes_every_row_in_the_csv(tmp_path):
    rows = compare.main(["--n", "32", "64", "--repeats", "1", "--min-time", "0", "--inputs", "clustered",
                         "--heads", "1", "--head-dim", "8", "--out", str(tmp_path), "--no-progress"])
    grid = compare.comparison_grid(["clustered"], [32, 64], [False, True])
    with (tmp_path / "compare.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == compare.CSV_FIELDS
        table = list(reader)
    assert len(table) == len(rows) == len(grid) + 2 * 2  # every budget plus exact's row per cell
    assert {r["method"] for r in table} == set(common.available())
    assert {(r["input"], int(r["n"]), r["causal"]) for r in table} == \
        {("clustered", n, c) for n in (32, 64) for c in ("False", "True")}
    exact_time = {(r["input"], r["n"], r["causal"]): float(r["time_s"]) for r in table if r["method"] == "exact"}
    for r in table:
        assert r["dtype"] == "float32"
        assert float(r["time_s"]) > 0 and math.isfinite(float(r["time_s"]))
        assert float(r["ratio_to_exact"]) == pytest.approx(float(r["time_s"]) / exact_time[r["input"], r["n"], r["causal"]])
        assert float(r["exact_fp32_time_s"]) == exact_time[r["input"], r["n"], r["causal"]]
        fro, spec = float(r["rel_fro"]), float(r["rel_spec"])
        assert math.isfinite(fro) and math.isfinite(spec) and fro >= 0 and spec >= 0
        if r["method"] == "exact":
            assert fro == 0.0 and float(r["ratio_to_exact"]) == 1.0
        else:
            assert 0 < fro < 20
    merged = compare.main(["--from_csv", str(tmp_path / "compare.csv"), "--out", str(tmp_path / "again")])
    assert merged == compare.read_csv([tmp_path / "compare.csv"])
    assert [(r["method"], r["n"], r["causal"], r["options"], r["rel_fro"]) for r in merged] == \
        [(r["method"], r["n"], r["causal"], r["options"], r["rel_fro"]) for r in rows]
    assert {p.name for p in (tmp_path / "again").iterdir()} == {"compare.csv", "compare_pareto.png",
                                                                "compare_scaling.png"}


def test_compare_half_precision_rows(tmp_path):
    rows = compare.main(["--n", "64", "--repeats", "1", "--min-time", "0", "--inputs", "clustered", "--heads", "1",
                         "--head-dim", "8", "--methods", "performer", "--causal", "no", "--dtype", "bfloat16",
                         "--out", str(tmp_path), "--no-progress"])
    assert [r["method"] for r in rows] == ["exact"] + ["performer"] * len(common.budget_options("performer", 64))
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    exact_time = rows[0]["time_s"]
    for r in rows:
        assert r["ratio_to_exact"] == pytest.approx(r["time_s"] / exact_time)
        assert r["exact_fp32_time_s"] == rows[0]["exact_fp32_time_s"] > 0


def test_read_csv_refuses_a_file_of_another_version(tmp_path):
    f = tmp_path / "old.csv"
    f.write_text("input,n,causal,method\ngaussian,64,False,exact\n")
    with pytest.raises(ValueError, match="lacks the column"):
        compare.read_csv([f])


def test_method_colours_are_distinct_and_follow_the_registry():
    names = common.methods()
    colours = [plotting.method_color(n) for n in names]
    assert len(set(colours)) == len(names)
    assert colours[0] == "#000000"  # exact, first in the registry's order
    assert plotting.method_color("not a method") == plotting.method_color("not a method")
    assert plotting.method_color("not a method") not in colours


def test_compare_inputs_are_the_registered_sources(tmp_path):
    f = tmp_path / "g.txt"
    f.write_text("".join(f"w{i} " + " ".join(str((i * 7 + j) % 5 - 2) for j in range(4)) + "\n" for i in range(40)))
    rows = compare.main(["--n", "16", "--repeats", "1", "--min-time", "0", "--inputs", "gaussian", "--glove", str(f),
                         "--methods", "exact", "--causal", "no", "--out", str(tmp_path), "--no-progress"])
    assert [(r["input"], r["method"]) for r in rows] == [("gaussian", "exact"), ("glove", "exact")]
    with pytest.raises(SystemExit):
        compare.main(["--inputs", "nope", "--out", str(tmp_path)])


def test_threads_option_is_checked_and_applied(tmp_path):
    """--quick runs on one thread (issue 17 item 6: spinning threads on a busy machine scrambled its medians)."""
    with pytest.raises(SystemExit):
        compare.main(["--threads", "0", "--out", str(tmp_path)])
    before = torch.get_num_threads()
    try:
        rows = compare.main(["--threads", "1", "--inputs", "gaussian", "--n", "32", "--causal", "no", "--methods",
                             "srf", "--repeats", "1", "--min-time", "0", "--no-progress", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 1 and {r["method"] for r in rows} == {"exact", "srf"}
    finally:
        torch.set_num_threads(before)


def test_quick_run_writes_outside_the_committed_assets_by_default(tmp_path, monkeypatch):
    from common import compare, plotting
    monkeypatch.chdir(tmp_path)
    committed = plotting.ASSETS / "compare.csv"
    before = committed.stat().st_mtime_ns
    compare.main(["--quick", "--n", "32", "--inputs", "gaussian", "--methods", "uniform", "--no-progress"])
    assert (tmp_path / compare.QUICK_OUT / "compare.csv").is_file()
    assert committed.stat().st_mtime_ns == before


def test_time_within_keeps_the_first_output_and_fits_the_timed_calls_before_the_deadline():
    import time
    from common.bench import time_within
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.01)
        return len(calls)

    out, timing = time_within(fn, repeats=5, deadline=time.perf_counter() + 10)
    assert out == 1 and len(timing.times_s) == 5 and len(calls) == 6 and timing.median_s >= 0.01
    calls.clear()
    out, timing = time_within(fn, repeats=5, deadline=time.perf_counter())  # past: still one timed call
    assert out == 1 and len(timing.times_s) == 1 and len(calls) == 2
