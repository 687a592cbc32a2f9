"""The recall task's answers are correct by construction (issue 14): each query's target is the token that
followed the one earlier occurrence of the same key, keys are unique, and the sequence is seeded."""
import pytest
import torch

from long_context.recall import IGNORE_INDEX, RecallTask, recall_accuracy, recall_batch


@pytest.mark.parametrize("n,pairs,queries", [(40, 8, 4), (257, 16, 16), (1024, 64, 8)])
def test_every_target_is_the_value_of_the_earlier_pair_with_that_key(n, pairs, queries):
    task = RecallTask(n=n, pairs=pairs, queries=queries, n_keys=64, n_values=16, n_distractors=8)
    tokens, targets = recall_batch(task, 6, torch.Generator().manual_seed(n))
    assert tokens.shape == targets.shape == (6, n) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < task.vocab_size
    context = n - 2 * queries
    for row_tokens, row_targets in zip(tokens.tolist(), targets.tolist()):
        scored = [t for t, y in enumerate(row_targets) if y != IGNORE_INDEX]
        assert scored == list(range(context, n, 2))
        pair_positions = [t for t in range(context) if row_tokens[t] < task.first_query_token]
        assert len(pair_positions) == pairs
        pair_key = {t: row_tokens[t] // task.n_values for t in pair_positions}
        assert len(set(pair_key.values())) == pairs  # distinct keys
        assert all(row_tokens[t] >= task.first_distractor_token for t in range(context) if t not in pair_key)
        for t in scored:
            key = row_tokens[t] - task.first_query_token
            assert 0 <= key < task.n_keys
            earlier = [s for s in pair_positions if pair_key[s] == key]
            assert len(earlier) == 1
            value = row_tokens[earlier[0]] % task.n_values
            assert row_targets[t] == task.first_answer_token + value == row_tokens[t + 1]
        asked = [row_tokens[t] for t in scored]
        assert len(set(asked)) == queries  # Q different keys are asked


def test_seeded_and_spread_over_the_whole_context():
    task = RecallTask(n=512, pairs=16, queries=8)
    assert task.with_length(1024) == RecallTask(n=1024, pairs=16, queries=8)
    a = recall_batch(task, 4, torch.Generator().manual_seed(1))
    b = recall_batch(task, 4, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    tokens, _ = recall_batch(task, 64, torch.Generator().manual_seed(2))
    positions = (tokens[:, : 512 - 16] < task.first_query_token).nonzero()[:, 1].float()
    # uniformly spread slots: some pairs sit in the first tenth of the context, far from the queries
    assert positions.min() < 50 and positions.max() > 440


def test_accuracy_counts_only_scored_positions():
    targets = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 1]])
    logits = torch.zeros(1, 4, 5)
    logits[0, 1, 3] = 1.0   # right
    logits[0, 3, 2] = 1.0   # wrong (target 1)
    logits[0, 0, 4] = 1.0   # unscored
    assert recall_accuracy(logits, targets).item() == 0.5
    with pytest.raises(ValueError, match="no scored position"):
        recall_accuracy(logits, torch.full((1, 4), IGNORE_INDEX))


@pytest.mark.parametrize("kwargs,match", [(dict(n=15, pairs=8, queries=4), "too short"),
                                          (dict(n=100, pairs=8, queries=9), "queries=9"),
                                          (dict(n=100, pairs=80, n_keys=64), "distinct keys"),
                                          (dict(n=0), "n must be")])
def test_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecallTask(**kwargs)


def test_active_keys_draws_keys_from_the_first_ones_only():
    task = RecallTask(n=64, pairs=4, queries=4, n_keys=32, n_values=8, n_distractors=8)
    tokens, targets = recall_batch(task, 16, torch.Generator().manual_seed(0), active_keys=6)
    pairs = tokens[tokens < task.first_query_token]
    assert (pairs // task.n_values).max() < 6 and pairs.numel() == 16 * 4
    queries = tokens[(tokens >= task.first_query_token) & (tokens < task.first_answer_token)]
    assert (queries - task.first_query_token).max() < 6
    for bad in (3, 33, 4.0):  # fewer than the pairs, more than the keys, not an int
        with pytest.raises(ValueError, match="active_keys"):
            recall_batch(task, 2, torch.Generator().manual_seed(0), active_keys=bad)
