"""The demos and the benchmark run end to end in quick mode and write the CSV they promise (columns, rows, sane
values); the library behind them (kdeformer.experiments) on small inputs."""
import csv
import math

import pytest
import torch

from common.data import synthetic_qkv
from kdeformer import benchmark, demo_biggan, demo_glove, experiments


def read_csv(path):
    with path.open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_demo_glove_quick_csv_on_standin_and_load_inputs_from_a_glove_file(tmp_path, capsys):
    demo_glove.main(["--quick", "--out", str(tmp_path)])
    assert "STAND-IN" in capsys.readouterr().out
    columns, rows = read_csv(tmp_path / "kdeformer_glove.csv")
    assert columns == experiments.GLOVE_COLUMNS
    budgets = [16, 64]  # --quick
    assert len(rows) == 1 + len(budgets) * len(experiments.GLOVE_METHODS)
    assert rows[0]["method"] == "exact" and float(rows[0]["rel_spec_err"]) == 0.0
    assert float(rows[0]["ratio_to_exact"]) == 1.0
    assert {(r["method"], int(r["num_feats"])) for r in rows[1:]} == \
        {(m, f) for m in experiments.GLOVE_METHODS for f in budgets}
    for r in rows:
        assert r["data"].startswith("stand-in") and r["n"] == "256" and r["batch"] == "2"
        assert 0 < float(r["time_s"]) < 60 and math.isclose(float(r["ratio_to_exact"]),
                                                              float(r["time_s"]) / float(rows[0]["time_s"]))
    for r in rows[1:]:
        assert 1e-4 < float(r["rel_spec_err"]) < 5  # approximations: neither exact nor meaningless
    kde = {int(r["num_feats"]): float(r["rel_spec_err"]) for r in rows if r["method"] == "kdeformer"}
    assert kde[64] < kde[16]  # more budget, less error
    assert (tmp_path / "kdeformer_glove.png").exists()
    glove = tmp_path / "vectors.txt"
    g = torch.Generator().manual_seed(0)
    glove.write_text("".join(f"w{i} " + " ".join(f"{x:.4f}" for x in torch.randn(6, generator=g).tolist()) + "\n"
                             for i in range(2 * 64 * 2)))
    q, k, v, source = experiments.load_inputs(glove, 64, 2, 0)
    assert source.startswith("GloVe") and q.shape == (2, 1, 64, 6) and torch.equal(q, k)
    with pytest.raises(ValueError, match="need 2 \\* n \\* batch"):
        experiments.load_inputs(glove, 128, 2, 0)
    with pytest.raises(ValueError, match="standin must be"):
        experiments.load_inputs(None, 64, 2, 0, standin="gaussian")


def test_demo_glove_reformer_rows_are_eight_and_one_rounds():
    # issue 16: the original demo hashes 8 rounds; 1 round is the extra row
    assert experiments.GLOVE_METHODS["reformer"][1](64) == {"bucket_size": 32, "n_hashes": 8}
    assert experiments.GLOVE_METHODS["reformer_1round"][1](64) == {"bucket_size": 32, "n_hashes": 1}


def test_demo_biggan_quick_csv_and_checkpoint_roundtrip(tmp_path):
    demo_biggan.main(["--quick", "--out", str(tmp_path)])
    columns, rows = read_csv(tmp_path / "kdeformer_biggan.csv")
    assert columns == ["method", "tokens", "attention_layer_s", "rel_err_attention", "rel_err_image"]
    assert [r["method"] for r in rows] == list(demo_biggan.METHOD_OPTIONS)
    assert all(r["tokens"] == "1024" and 0 < float(r["attention_layer_s"]) < 60 for r in rows)
    assert float(rows[0]["rel_err_attention"]) == 0.0 and float(rows[0]["rel_err_image"]) == 0.0
    for r in rows[1:]:
        assert 0 < float(r["rel_err_attention"]) < 2 and 0 < float(r["rel_err_image"]) < 2
    assert (tmp_path / "kdeformer_biggan.png").exists()
    gen = demo_biggan.build_generator("exact", 32, 5, None)
    torch.save(gen.state_dict(), tmp_path / "g.pt")
    loaded = demo_biggan.build_generator("exact", 32, 6, tmp_path / "g.pt")
    z = torch.randn(1, 120)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), gen(z))
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match Generator"):
        demo_biggan.build_generator("exact", 32, 0, tmp_path / "bad.pt")


def test_benchmark_quick_csv(tmp_path):
    benchmark.main(["--quick", "--dtypes", "float32", "--out", str(tmp_path)])
    columns, rows = read_csv(tmp_path / "kdeformer_speed.csv")
    assert columns == experiments.SPEED_COLUMNS
    assert [(r["method"], r["bucket_size"], r["sample_size"]) for r in rows] == \
        [("exact", "", ""), ("kdeformer", "64", "128"), ("kdeformer", "128", "256")]
    assert all(r["n"] == "2048" and r["dtype"] == "float32" and r["causal"] == "False" for r in rows)
    assert float(rows[0]["speedup"]) == 1.0 and float(rows[0]["rel_spec_err"]) == 0.0
    for r in rows[1:]:
        assert 0 < float(r["time_s"]) < 60 and 0 < float(r["speedup"]) < 1000
        assert 1e-4 < float(r["rel_spec_err"]) < 5 and 0 <= float(r["rel_spec_err_std"]) < float(r["rel_spec_err"])
    assert benchmark.parse_config("256:1024") == (256, 1024)


@pytest.mark.parametrize("causal", [False, True])
def test_speed_rows_profile_and_figure(tmp_path, causal):
    x = synthetic_qkv("clustered", 1, 1, 256, 256, 16, dtype=torch.float64)
    rows = experiments.speed_rows(x.q, x.k, x.v, [(32, 64), (256, 0)], num_bits=7, repeats=2, seed=0,
                                  causal=causal, progress=False)
    assert [r["method"] for r in rows] == ["exact", "kdeformer", "kdeformer"]
    assert all(r["causal"] == causal for r in rows)
    assert rows[1]["rel_spec_err"] > 1e-3 and rows[2]["rel_spec_err"] < 1e-10  # one bucket of all keys is exact
    if not causal:
        stages = experiments.stage_profile(x.q, x.k, x.v, (32, 64), num_bits=7, seed=0)
        assert set(experiments.STAGES) < set(stages) and all(stages[s] > 0 for s in experiments.STAGES)
        assert stages["total"] >= sum(stages[s] for s in experiments.STAGES)
    assert experiments.plot_speed(rows, "clustered test data", 256, tmp_path / "speed.png").exists()
