"""Issue 17, item 4: the README's train-then-sample workflow with a method whose budget exceeds the keys of a
decoding step. knn with an explicit k larger than the prompt raised "k=8 is larger than the number of keys
Nk=6", and sblocal with the default use_cache=True raised "needs Nq == Nk"; budgets now clamp (warning once)."""
import pytest

from nanoGPT import sample as sample_module


@pytest.mark.parametrize("attention, options, use_cache", [("knn", "{'k': 8}", True), ("knn", "{'k': 8}", False),
                                                           ("sblocal", "{}", True)])
def test_sample_with_a_budget_larger_than_the_prompt(tiny_run, attention, options, use_cache):
    """A 6-character prompt and 6 new characters: the decoding steps see 6 to 11 keys, fewer than k = 8 at first."""
    _, out_dir = tiny_run
    args = [f"--out_dir={out_dir}", "--start=ROMEO:", "--max_new_tokens=6", "--num_samples=2",
            f"--attention={attention}", f"--attention_options={options}", f"--use_cache={use_cache}"]
    texts = sample_module.main(args)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 6 for t in texts)
    assert texts == sample_module.main(args)  # seeded by --seed: the same text again
