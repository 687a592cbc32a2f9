"""The paper's experiment scripts (issue 16) and the GPU check (issue 13) on tiny sizes: the CSV rows they write
hold sane values."""
import csv
import math

from knn_attention import experiment_efficiency_paper, experiment_forward_error, experiment_grad_descent, gpu_check


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_forward_error_script_writes_every_scale_and_k(tmp_path):
    experiment_forward_error.main(["--quick", "--n", "64", "--heads", "1", "--repeats", "2", "--estimators", "topk_uniform_tail",
                                   "--out", str(tmp_path)])
    rows = _rows(tmp_path / "knn_forward_error.csv")
    ks = [k for k, _ in experiment_forward_error.k_grid(64)]
    assert len(rows) == len(experiment_forward_error.SCALES) * len(ks)
    assert all(0 <= float(r["mean_abs_error"]) < 4.0 for r in rows)  # |o - o_hat| <= 2 max|v| <= 2 B
    for scale in experiment_forward_error.SCALES:  # k = n^1/2 beats k = 2 or 3 at every B
        errs = [float(r["mean_abs_error"]) for r in rows if float(r["B"]) == scale]
        assert errs[-1] < errs[0]
    assert (tmp_path / "knn_forward_error.png").stat().st_size > 0


def test_paper_grad_descent_descends_with_both_gradients():
    curves = experiment_grad_descent.run_paper("quadratic", iters=5, progress=False)
    assert len(curves["naive"]) == len(curves["fast"]) == len(curves["fast_forward_error"]) == 6
    assert curves["naive"][0] == curves["fast"][0]  # same start, loss evaluated exactly
    assert curves["naive"][-1] < curves["naive"][0] and curves["fast"][-1] < curves["fast"][0]
    assert all(0 <= e < 1 for e in curves["fast_forward_error"])


def test_efficiency_paper_measure_rows():
    rows = experiment_efficiency_paper.measure(256, ["knn-quarter", "gumbel"], 16, 1, 0, "cpu")
    assert [r["config"] for r in rows] == ["knn-quarter", "gumbel"]
    for r in rows:
        assert r["exact_s"] > 0 and r["knn_s"] > 0 and math.isfinite(r["rel_fro"])
    # lazy Gumbel: |S_i| = 16 plus about 32 samples x sqrt(n) tail candidates, far below the 32 n of dense sampling
    assert 16 <= rows[1]["evaluations_per_query"] < 32 * 256 / 4


def test_gpu_check_runs_on_the_cpu_at_tiny_n(tmp_path):
    """knn_attention.gpu_check (the GPU script) end to end on the CPU: every timed config and the error table give
    a finite error and a positive time, and the CSV holds every row."""
    rows = gpu_check.main(["--quick", "--device", "cpu", "--n", "64", "--error-n", "64", "--repeats", "1",
                           "--no-pytest", "--no-profile", "--out", str(tmp_path)])
    timed = [r for r in rows if r["table"] == "timing" and r["config"] != "exact"]
    assert {r["config"] for r in timed if not r["causal"]} == {"mid", "mid-topk", "low"}
    assert {r["config"] for r in timed if r["causal"]} == {"mid", "mid-topk", "low", "mid-L2", "mid-mask", "low-mask"}
    assert all(r["status"] == "ok" and r["fwd_ms"] > 0 and r["rel_fro"] >= 0 for r in timed)
    errors = [r for r in rows if r["table"] == "error"]
    assert {r["input"] for r in errors} == {"clustered", "clustered_concentrated", "gaussian"}
    assert all(math.isfinite(r["rel_fro"]) for r in errors)
    assert len(_rows(tmp_path / "knn_gpu.csv")) == len(rows)
