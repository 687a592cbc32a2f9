"""The scripts' shared behaviour (issue 17, items 8 and 9): --quick everywhere, a swapped randomised method seeded
by --seed, a progress bar over evaluation batches, files written with the umask's mode."""
import os

import pytest

import common
from nanoGPT import evaluate as evaluate_module
from nanoGPT import sample as sample_module
from nanoGPT import train as train_module
from nanoGPT.atomic import write_atomically
from nanoGPT.checkpoint import load_model
from nanoGPT.configurator import ConfigError, load_config, read_config_file
from nanoGPT.evaluate import EvalConfig, evaluate
from nanoGPT.sample import SampleConfig
from nanoGPT.train import TrainConfig

TINY = read_config_file("config/train_tiny.py")


def test_quick_train_config_is_the_tiny_run():
    cfg = load_config(TrainConfig, ["--quick"], quick=train_module.QUICK)
    assert {k: getattr(cfg, k) for k in TINY} == TINY and cfg.overwrite  # reruns replace the quick run
    # After the config files, before explicit overrides: an override still wins, a config file does not.
    cfg = load_config(TrainConfig, ["--quick", "config/train_shakespeare_char_cpu.py", "--max_iters=7"],
                      quick=train_module.QUICK)
    assert (cfg.n_embd, cfg.block_size, cfg.max_iters) == (TINY["n_embd"], TINY["block_size"], 7)
    assert load_config(TrainConfig, ["--quick=False"], quick=train_module.QUICK).n_embd == TrainConfig().n_embd


def test_quick_is_refused_where_a_script_has_none():
    with pytest.raises(ConfigError, match="unknown config key 'quick'"):
        load_config(TrainConfig, ["--quick=True"])
    with pytest.raises(ConfigError, match="quick must be True or False"):
        load_config(TrainConfig, ["--quick=3"], quick=train_module.QUICK)


def test_train_main_quick(tmp_path):
    result = train_module.main(["--quick", f"--out_dir={tmp_path}", "--progress=False", "--max_iters=3",
                                "--eval_iters=1"])
    model, meta = load_model(tmp_path)
    assert result["iter_num"] == 3 and meta["config"]["n_embd"] == TINY["n_embd"]
    assert (model.config.n_layer, model.config.block_size) == (TINY["n_layer"], TINY["block_size"])


def test_sample_and_evaluate_quick_use_the_quick_run(tiny_run):
    _, out_dir = tiny_run
    cfg = load_config(SampleConfig, ["--quick"], quick=sample_module.QUICK)
    assert (cfg.out_dir, cfg.num_samples, cfg.max_new_tokens) == (TINY["out_dir"], 1, 100)
    cfg = load_config(EvalConfig, ["--quick"], quick=evaluate_module.QUICK)
    assert (cfg.out_dir, cfg.max_batches) == (TINY["out_dir"], 2)
    (text,) = sample_module.main(["--quick", f"--out_dir={out_dir}", "--start=ROMEO:"])
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 100
    (row,) = evaluate_module.main(["--quick", f"--out_dir={out_dir}", "--progress=False"])
    model, meta = load_model(out_dir)
    assert row["loss"] == pytest.approx(evaluate(model, "val", meta["config"]["batch_size"], 2, 0)["loss"], abs=1e-6)


def test_compare_training_quick_is_ten_steps(tmp_path):
    from nanoGPT import compare_training

    rows = compare_training.main(["--quick", "--methods", "exact", "--out", str(tmp_path),
                                  "--runs_dir", str(tmp_path / "runs"), "--no-progress"])
    assert [r["iter"] for r in rows] == [0, 5, 10]
    _, meta = load_model(tmp_path / "runs" / "exact")
    assert (meta["config"]["n_embd"], meta["config"]["eval_iters"]) == (TINY["n_embd"], 2)


def test_missing_checkpoint_is_a_message_not_a_traceback(tmp_path):
    for script in (sample_module, evaluate_module):
        with pytest.raises(SystemExit, match=f"nanoGPT.{script.__name__.split('.')[-1]}: no checkpoint at"):
            script.main([f"--out_dir={tmp_path}"])


def test_evaluate_swapped_randomised_method_repeats_without_a_seed_option(tiny_run):
    """Issue 17 item 8: `evaluate --attention=knn` without a seed option gave a different loss on each run; the
    run's --seed now seeds the method too, so the same command gives the same loss, and another seed another."""
    _, out_dir = tiny_run
    args = [f"--out_dir={out_dir}", "--attention=knn", "--attention_options={'k': 2, 'num_samples': 2}",
            "--max_batches=2", "--progress=False"]
    first, second = (evaluate_module.main(args)[0] for _ in range(2))
    assert first["loss"] == second["loss"]
    assert '"seed": 0' in first["options"]
    other = evaluate_module.main(args + ["--seed=1"])[0]
    assert '"seed": 1' in other["options"] and other["loss"] != first["loss"]


def test_sample_swapped_randomised_method_repeats_without_a_seed_option(tiny_run):
    _, out_dir = tiny_run
    args = [f"--out_dir={out_dir}", "--attention=uniform", "--attention_options={'num_samples': 2}",
            "--max_new_tokens=30", "--num_samples=1"]
    assert sample_module.main(args) == sample_module.main(args)


def test_evaluate_shows_progress_over_batches(tiny_run, capsys):
    _, out_dir = tiny_run
    model, _ = load_model(out_dir)
    evaluate(model, "val", 2, 3, 0, progress=True)
    err = capsys.readouterr().err
    assert "val exact:   0%" in err and "0/3 [" in err  # a bar over the 3 batches (cleared when done)
    evaluate(model, "val", 2, 3, 0)
    assert capsys.readouterr().err == ""


def test_swap_candidates_follow_the_registry():
    runs = evaluate_module.swap_candidates(32, seed=5)
    names = common.methods(causal=True)
    assert list(dict.fromkeys(name for name, _ in runs)) == names
    assert runs == [(n, o) for n in names for o in common.budget_options(n, 32, 5)]
    assert all(o.get("seed") == 5 for n, o in runs if common.method_class(n).randomized)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomically(tmp_path / "f.bin", lambda f: f.write(b"abc"))
        write_atomically(tmp_path / "f.bin", lambda f: f.write(b"abcd"))  # replacing keeps the umask's mode
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").read_bytes() == b"abcd"
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_training_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        train_module.train(load_config(TrainConfig, ["--quick", f"--out_dir={tmp_path}", "--progress=False",
                                                     "--max_iters=1", "--eval_iters=1"], quick=train_module.QUICK))
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"ckpt.pt": 0o644,
                                                                              "loss_curve.csv": 0o644}


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
