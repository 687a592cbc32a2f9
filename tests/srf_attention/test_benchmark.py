"""The benchmark script runs end to end (tiny sizes; no assertion on time) and SRF's decoding state is constant."""
from srf_attention import benchmark


def test_benchmark_writes_table_and_state_is_constant(tmp_path):
    rows = benchmark.main(["--lengths", "64", "256", "--repeats", "1", "--threads", "1", "--nb-features", "16",
                           "--out", str(tmp_path)])
    state = {(r["method"], r["L"]): r["state_bytes"] for r in rows if r["part"] == "generation"}
    assert state[("srf", 64)] == state[("srf", 256)] == 4 * (16 * 64 + 16 + 1)  # kv, denominator, key_maxima
    assert state[("exact", 256)] == 4 * state[("exact", 64)] == 4 * 2 * 64 * 64 * 4  # keys and values, float32
    assert all(r["time_s"] > 0 for r in rows)
    assert (tmp_path / "srf_benchmark.csv").read_text().startswith("part,method,L")
    assert (tmp_path / "srf_benchmark.png").stat().st_size > 1000
