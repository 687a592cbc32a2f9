"""The GPU benchmark script, run on the CPU at tiny n: its CSV's columns and rows, failures as rows, the figure."""
import csv
import math

import pytest
import torch

import common
from common import gpu_benchmark


def _read(path):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.slow
def test_quick_run_on_the_cpu_writes_one_row_per_method_and_cell(tmp_path):
    rows = gpu_benchmark.main(["--quick", "--device", "cpu", "--n", "48", "--repeats", "1", "--out", str(tmp_path)])
    fields, table = _read(tmp_path / "gpu_benchmark.csv")
    assert fields == gpu_benchmark.CSV_FIELDS and len(table) == len(rows)
    expected = [(48, causal, name) for causal in (False, True) for name in common.methods(causal=causal)]
    assert [(int(r["n"]), r["causal"] == "True", r["method"]) for r in table] == expected
    for r in table:
        assert r["dtype"] == "bfloat16" and r["device"] == "cpu" and r["status"] in ("ok", "error")
        if r["status"] != "ok":  # a method that fails in bfloat16 on the CPU is reported, not fatal
            assert r["message"] and r["method"] != "exact"
            continue
        causal, trainable = r["causal"] == "True", common.method_class(r["method"]).trainable
        assert float(r["fwd_time_s"]) > 0 and int(r["fwd_repeats"]) == 1 and int(r["error_rows"]) == 48
        exact = next(e for e in table if e["method"] == "exact" and e["causal"] == r["causal"])
        assert float(r["exact_fwd_time_s"]) == float(exact["fwd_time_s"])
        assert float(r["fwd_ratio_to_exact"]) == pytest.approx(float(r["fwd_time_s"]) / float(exact["fwd_time_s"]))
        assert float(r["exact_fp32_time_s"]) > 0
        assert (r["fwd_bwd_time_s"] != "") == (causal and trainable)
        if causal and trainable:
            assert float(r["fwd_bwd_ratio_to_exact"]) == pytest.approx(
                float(r["fwd_bwd_time_s"]) / float(exact["fwd_bwd_time_s"]))
        fro = float(r["rel_fro"])
        assert math.isfinite(fro) and (fro < 0.02 if r["method"] == "exact" else 0 < fro < 20)
    assert gpu_benchmark.read_csv(tmp_path / "gpu_benchmark.csv") == rows
    again = gpu_benchmark.main(["--from_csv", str(tmp_path / "gpu_benchmark.csv"), str(tmp_path / "gpu_benchmark.csv"),
                                "--out", str(tmp_path / "fig")])
    assert again == rows + rows and (tmp_path / "fig" / "gpu_benchmark.png").is_file()
    assert len(_read(tmp_path / "fig" / "gpu_benchmark.csv")[1]) == 2 * len(rows)


def test_error_rows_are_the_exact_rows_of_the_reference():
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    rows = gpu_benchmark.sample_rows(40, 7, seed=1, device="cpu")
    assert rows.numel() == 7 and torch.equal(rows, rows.unique())
    for causal in (False, True):
        full = common.get_attention("exact")(q.float(), k.float(), v.float(), causal=causal)
        assert torch.allclose(gpu_benchmark.exact_rows(q, k, v, rows, causal), full[:, :, rows], atol=1e-6)


def test_a_failing_method_is_a_row_and_is_not_run_again(tmp_path, monkeypatch):
    real = gpu_benchmark.chosen_budgets
    monkeypatch.setattr(gpu_benchmark, "chosen_budgets",
                        lambda name, n, seed, budget: [("mid", {"num_samples": -1})] if name == "uniform"
                        else real(name, n, seed, budget))
    rows = gpu_benchmark.run_benchmark((16, 32), (False,), ["uniform", "performer"], heads=1, head_dim=8,
                                       dtype=torch.float32, device="cpu", repeats=1, error_rows=8)
    by = {(r["n"], r["method"]): r for r in rows}
    assert [(r["n"], r["method"]) for r in rows] == [(n, m) for n in (16, 32) for m in ("exact", "performer", "uniform")]
    assert by[16, "uniform"]["status"] == "error" and "uniform" in by[16, "uniform"]["message"]
    assert by[32, "uniform"]["status"] == "skipped" and by[32, "uniform"]["message"] == "error at n=16"
    assert by[32, "performer"]["status"] == "ok" and by[32, "performer"]["fwd_time_s"] > 0


def test_a_backward_that_fails_keeps_the_forward_measurement(monkeypatch):
    """On the H100 the causal backward of knn / tree / uniform ran out of memory at 131,072 and took the forward's
    measurement with it; now the row keeps its forward time and error and says why the fwd + bwd cell is empty."""
    real = gpu_benchmark.get_attention

    class ForwardOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out):
            return out.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.30 GiB")

    class BackwardFails(torch.nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.attn = attn

        def forward(self, q, k, v, causal):
            return ForwardOnly.apply(self.attn(q, k, v, causal=causal))

    def get_attention(name, **options):
        attn = real(name, **options)
        return BackwardFails(attn) if name == "uniform" else attn

    monkeypatch.setattr(gpu_benchmark, "get_attention", get_attention)
    rows = gpu_benchmark.run_benchmark((16, 32), (True,), ["uniform"], heads=1, head_dim=8, dtype=torch.float32,
                                       device="cpu", repeats=1, error_rows=8)
    uniform = [r for r in rows if r["method"] == "uniform"]
    assert [r["n"] for r in uniform] == [16, 32]  # not skipped at the larger n
    for row in uniform:
        assert row["status"] == "ok" and row["fwd_time_s"] > 0 and math.isfinite(row["rel_fro"])
        assert row.get("fwd_bwd_time_s") is None and row["fwd_bwd_ratio_to_exact"] is None
        assert row["message"].startswith("forward + backward oom: OutOfMemoryError")
    assert all(r["fwd_bwd_time_s"] > 0 for r in rows if r["method"] == "exact")


def test_a_row_past_its_time_limit_is_a_timeout_row():
    rows = gpu_benchmark.run_benchmark((16,), (True,), ["performer"], heads=1, head_dim=8, dtype=torch.float32,
                                       device="cpu", repeats=1, error_rows=8, row_time_limit=1e-6)
    assert [(r["method"], r["status"]) for r in rows] == [("exact", "timeout"), ("performer", "skipped")]
    assert "time limit" in rows[0]["message"] and rows[1]["message"] == "no exact reference in this cell"


def test_lengths_not_started_within_the_time_budget_are_skipped_rows():
    rows = gpu_benchmark.run_benchmark((16, 32), (False, True), ["performer"], heads=1, head_dim=8,
                                       dtype=torch.float32, device="cpu", repeats=1, error_rows=8, time_budget=0)
    assert [(r["n"], r["causal"], r["method"]) for r in rows] == \
        [(n, c, m) for n in (16, 32) for c in (False, True) for m in ("exact", "performer")]
    assert {r["status"] for r in rows} == {"skipped"} and rows[0]["message"] == "time budget of 0 s spent"


def test_markdown_table_has_a_line_per_row():
    row = {field: None for field in gpu_benchmark.CSV_FIELDS} | {
        "n": 16, "causal": False, "method": "performer", "options": {"nb_features": 8, "seed": 0}, "status": "oom",
        "message": "OutOfMemoryError: CUDA out of memory"}
    table = gpu_benchmark.markdown_table([row]).splitlines()
    assert len(table) == 3 and "nb_features=8" in table[2] and "oom: OutOfMemoryError" in table[2]


def test_the_float32_extra_column_never_takes_the_cell_with_it(tmp_path, monkeypatch):
    """At 262,144 tokens on an H100 exact attention in float32 ran past the row limit and the whole cell was lost;
    now a float32 run that fails leaves its column empty and the bf16 baseline and every method still run."""
    x = torch.randn(1, 1, 16, 8)
    assert gpu_benchmark.exact_fp32_time(common.get_attention("exact"), x, x, x, False, repeats=1,
                                         row_time_limit=5.0, device="cpu") > 0

    def out_of_memory(q, k, v, causal):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert gpu_benchmark.exact_fp32_time(out_of_memory, x, x, x, False, repeats=1, row_time_limit=5.0,
                                         device="cpu") is None
    monkeypatch.setattr(gpu_benchmark, "exact_fp32_time", lambda *args, **kwargs: None)
    rows = gpu_benchmark.main(["--quick", "--device", "cpu", "--n", "48", "--repeats", "1", "--causal", "no",
                               "--methods", "srf", "--out", str(tmp_path)])
    assert [(r["method"], r["status"]) for r in rows] == [("exact", "ok"), ("srf", "ok")]
    assert all(r["exact_fp32_time_s"] is None for r in rows)
    assert (tmp_path / "gpu_benchmark.png").is_file()


def test_budget_all_gives_a_row_per_declared_budget_each_timed_against_the_same_exact():
    rows = gpu_benchmark.run_benchmark((48,), (False,), ["uniform", "srf"], source="gaussian", heads=2, head_dim=8,
                                       dtype=torch.float32, device="cpu", repeats=1, budget="all", error_rows=8)
    exact = next(r for r in rows if r["method"] == "exact")
    for name in ("uniform", "srf"):
        declared = common.budget_options(name, 48, 0)
        mine = [r for r in rows if r["method"] == name]
        assert [r["options"] for r in mine] == [declared[0], declared[len(declared) // 2], declared[-1]]
        assert [r["budget"] for r in mine] == ["low", "mid", "high"]
        assert all(r["status"] == "ok" and r["exact_fwd_time_s"] == exact["fwd_time_s"] for r in mine)
    assert gpu_benchmark.chosen_budgets("srf", 48, 0, "high") == [("high", common.budget_options("srf", 48, 0)[-1])]
