"""The two demos run end to end in quick mode and write what they promise."""
import csv

import pytest
import torch

from common.data import synthetic_qkv
from kdeformer import benchmark, demo_biggan, demo_glove


def test_demo_glove_quick_on_standin_and_on_a_glove_file(tmp_path, capsys):
    rows = demo_glove.main(["--quick", "--out", str(tmp_path)])
    assert "STAND-IN" in capsys.readouterr().out
    assert {r["method"] for r in rows} == {"exact", *demo_glove.METHODS}
    assert all(r["rel_spec_err"] >= 0 and r["time_s"] > 0 for r in rows)
    assert (tmp_path / "kdeformer_glove.png").stat().st_size > 1000
    data = list(csv.DictReader((tmp_path / "kdeformer_glove.csv").open()))
    assert data[0]["data"].startswith("stand-in")
    glove = tmp_path / "vectors.txt"
    g = torch.Generator().manual_seed(0)
    glove.write_text("".join(f"w{i} " + " ".join(f"{x:.4f}" for x in torch.randn(6, generator=g).tolist()) + "\n"
                             for i in range(2 * 64 * 2)))
    q, k, v, source = demo_glove.load_inputs(glove, 64, 2, 0)
    assert source.startswith("GloVe") and q.shape == (2, 1, 64, 6) and torch.equal(q, k)
    with pytest.raises(ValueError, match="need 2 \\* n \\* batch"):
        demo_glove.load_inputs(glove, 128, 2, 0)


def test_demo_biggan_quick_exact_row_is_zero_and_checkpoint_roundtrip(tmp_path):
    rows = demo_biggan.main(["--quick", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == list(demo_biggan.METHOD_OPTIONS)
    assert rows[0]["rel_err_attention"] == 0.0 and rows[0]["rel_err_image"] == 0.0
    assert (tmp_path / "kdeformer_biggan.png").stat().st_size > 1000
    gen = demo_biggan.build_generator("exact", 32, 5, None)
    torch.save(gen.state_dict(), tmp_path / "g.pt")
    loaded = demo_biggan.build_generator("exact", 32, 6, tmp_path / "g.pt")
    z = torch.randn(1, 120)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z), gen(z))
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not match Generator"):
        demo_biggan.build_generator("exact", 32, 0, tmp_path / "bad.pt")


def test_benchmark_rows_profile_and_figure(tmp_path):
    x = synthetic_qkv("clustered", 1, 1, 256, 256, 16, dtype=torch.float64)
    rows = benchmark.measure(x.q, x.k, x.v, [(32, 64), (256, 0)], num_bits=7, repeats=2, seed=0, progress=False)
    assert [r["method"] for r in rows] == ["exact", "kdeformer", "kdeformer"]
    assert rows[0]["speedup"] == 1.0 and all(r["time_s"] > 0 for r in rows)
    assert rows[1]["rel_spec_err"] > 0 and rows[2]["rel_spec_err"] < 1e-10  # one bucket of all keys is exact
    stages = benchmark.stage_profile(x.q, x.k, x.v, (32, 64), num_bits=7, seed=0)
    assert set(benchmark.STAGES) < set(stages) and all(stages[s] > 0 for s in benchmark.STAGES)
    assert benchmark.plot(rows, "clustered test data", 256, tmp_path / "speed.png").stat().st_size > 1000
    assert benchmark.parse_config("256:1024") == (256, 1024)
