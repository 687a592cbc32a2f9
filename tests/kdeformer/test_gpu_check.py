"""kdeformer.gpu_check on the CPU at tiny n: every row measured, failures caught per row, the time budget kept."""
import csv

import pytest
import torch

import kdeformer.gpu_check as gpu_check

CELLS = ((64, True), (128, True), (128, False))


@pytest.mark.slow
def test_rows_time_and_score_every_method_and_budget(tmp_path):
    rows = gpu_check.run_check(CELLS, ("kdeformer", "tree"), device="cpu", repeats=1, error_max_n=64,
                               time_budget=120.0, kernels=("torch",),
                               on_row=lambda r: gpu_check.write_csv(r, tmp_path / "c.csv"))
    assert len(rows) == 3 * (1 + 2 * 3) and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["time_s"] > 0 and r["ratio_to_exact"] > 0 and r["dtype"] == "bfloat16"
        assert (r["rel_fro"] is not None) == (r["n"] <= 64)  # the error only up to error_max_n
        assert (r["inner_products_per_query"] is not None) == (r["method"] == "tree")
    assert rows[0]["rel_fro"] < 0.01  # exact in bfloat16 vs float32
    with (tmp_path / "c.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_a_failing_call_is_a_row_and_the_run_goes_on(monkeypatch):
    real = gpu_check.get_attention

    def get_attention(name, **options):
        if name == "uniform" and options["num_samples"] == 8:  # the middle budget at n = 64
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")
        return real(name, **options)

    monkeypatch.setattr(gpu_check, "get_attention", get_attention)
    rows = gpu_check.run_check(CELLS[:2], ("uniform",), device="cpu", repeats=1, time_budget=120.0)
    status = {(r["n"], r["budget"]): r["status"] for r in rows if r["method"] == "uniform"}
    assert status == {(64, "low"): "ok", (64, "mid"): "oom", (64, "high"): "ok",
                      (128, "low"): "ok", (128, "mid"): "skipped", (128, "high"): "ok"}


def test_kdeformer_rows_per_kernel_side_by_side_same_draws():
    # the torch and triton kernels of one budget in adjacent rows; on a machine without CUDA the triton rows are
    # errors that name the reason and the run goes on
    rows = gpu_check.run_check(CELLS[1:2], ("kdeformer",), device="cpu", repeats=1, error_max_n=128,
                               time_budget=120.0)
    assert [(r["budget"], r["kernel"]) for r in rows[1:]] == [(b, k) for b in ("low", "mid", "high")
                                                              for k in ("torch", "triton")]
    assert all(r["options"]["kernel"] == r["kernel"] for r in rows[1:])
    for torch_row, triton_row in zip(rows[1::2], rows[2::2]):
        assert torch_row["status"] == "ok" and torch_row["rel_fro"] > 0
        if torch.cuda.is_available():
            assert triton_row["status"] == "ok"
        else:
            assert triton_row["status"] == "error" and "kernel='triton' cannot run" in triton_row["message"]


def test_a_spent_time_budget_skips_the_rows_left():
    rows = gpu_check.run_check(CELLS, ("sblocal",), device="cpu", repeats=1, time_budget=0.0)
    assert len(rows) == 3 * 4 and {r["status"] for r in rows} == {"skipped"}


@pytest.mark.slow
def test_main_writes_the_csv_and_the_profiles(tmp_path):
    gpu_check.main(["--quick", "--device", "cpu", "--methods", "reformer", "--repeats", "1",
                    "--out", str(tmp_path / "k.csv")])
    assert (tmp_path / "k.csv").exists()
    profiles = (tmp_path / "k_profile.txt").read_text()
    assert "## kdeformer" in profiles and "kdeformer.block_attention" in profiles and "## tree" in profiles
    assert "## gathers" in profiles and "embedding:" in profiles
