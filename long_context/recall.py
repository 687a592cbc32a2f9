"""Multi-query associative recall with the pairs scattered far back (after Arora et al. 2023, "Zoology", Sec. 3).

A sequence of n tokens holds P key-value pairs at random positions in a stream of distractor tokens; its last
2Q positions ask Q of those keys again, each followed by its answer:

    d d (k_1 v_1) d d d ... d (k_2 v_2) d ... d (k_P v_P) d d ... | ?k_a  v_a  ?k_b  v_b  ...
                                                                    query answer ...

Each pair is ONE token (there are n_keys * n_values pair tokens), so finding the answer needs no position at
all: the query ``?k`` must put its attention on the one pair token with key k among all n tokens and read v
off it. That is the sharp, content-based retrieval far back that an approximate attention can lose; a model
without position embeddings learns it at one length and runs at any other. Keys are distinct within a sequence,
and the pair positions are uniform over the context, so many answers sit thousands of tokens before their query.

Vocabulary, in this order: pair tokens ``k * n_values + v``, query tokens ``?k``, answer tokens ``v``,
distractors. The model is scored where the input is a query: its next-token prediction must be the answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -1  # targets that are not scored (cross_entropy's ignore_index)


@dataclass(frozen=True)
class RecallTask:
    """The task's sizes: sequence length n, P pairs per sequence, Q queries, and the vocabularies."""
    n: int
    pairs: int = 16
    queries: int = 16
    n_keys: int = 64
    n_values: int = 16
    n_distractors: int = 64

    def __post_init__(self):
        for name in ("n", "pairs", "queries", "n_keys", "n_values", "n_distractors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RecallTask: {name} must be an int >= 1, got {value!r}")
        if self.pairs > self.n_keys:
            raise ValueError(f"RecallTask: pairs={self.pairs} needs as many distinct keys, n_keys={self.n_keys}")
        if self.queries > self.pairs:
            raise ValueError(f"RecallTask: queries={self.queries} must be <= pairs={self.pairs}")
        if self.pairs + 2 * self.queries > self.n:
            raise ValueError(f"RecallTask: n={self.n} is too short for {self.pairs} pairs and {self.queries} "
                             f"queries (needs >= {self.pairs + 2 * self.queries})")

    @property
    def first_query_token(self) -> int:
        return self.n_keys * self.n_values

    @property
    def first_answer_token(self) -> int:
        return self.first_query_token + self.n_keys

    @property
    def first_distractor_token(self) -> int:
        return self.first_answer_token + self.n_values

    @property
    def vocab_size(self) -> int:
        return self.first_distractor_token + self.n_distractors

    def with_length(self, n: int) -> "RecallTask":
        """The same task (vocabularies, P, Q) at another sequence length."""
        return RecallTask(n, self.pairs, self.queries, self.n_keys, self.n_values, self.n_distractors)


def recall_batch(task: RecallTask, batch_size: int, generator: torch.Generator, device="cpu",
                 active_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets), both (batch_size, n) int64. targets[b, t] is the answer token that must follow the
    query tokens[b, t], IGNORE_INDEX elsewhere. Drawn on the CPU from ``generator`` (a seed fixes the batch on
    any device), then moved to ``device``. ``active_keys``: draw the keys from the first ``active_keys`` only
    (pairs <= active_keys <= n_keys; a training curriculum), all of them by default."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"recall_batch: batch_size must be an int >= 1, got {batch_size!r}")
    active = task.n_keys if active_keys is None else active_keys
    if isinstance(active, bool) or not isinstance(active, int) or not task.pairs <= active <= task.n_keys:
        raise ValueError(f"recall_batch: active_keys must be an int in [pairs={task.pairs}, n_keys={task.n_keys}], "
                         f"got {active_keys!r}")
    b, n, p, q = batch_size, task.n, task.pairs, task.queries
    context = n - 2 * q
    tokens = task.first_distractor_token + torch.randint(task.n_distractors, (b, n), generator=generator)
    keys = torch.rand(b, active, generator=generator).argsort(-1)[:, :p]               # P distinct keys per row
    values = torch.randint(task.n_values, (b, p), generator=generator)
    slots = torch.rand(b, context, generator=generator).argsort(-1)[:, :p]             # P distinct positions
    rows = torch.arange(b).unsqueeze(1)
    tokens[rows, slots] = keys * task.n_values + values
    asked = torch.rand(b, p, generator=generator).argsort(-1)[:, :q]                    # Q of the P keys
    query_pos = context + 2 * torch.arange(q)
    answers = task.first_answer_token + values.gather(1, asked)
    tokens[:, query_pos] = task.first_query_token + keys.gather(1, asked)
    tokens[:, query_pos + 1] = answers
    targets = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    targets[:, query_pos] = answers
    return tokens.to(device), targets.to(device)


def recall_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of the scored positions (targets != IGNORE_INDEX) whose arg-max prediction is the target."""
    scored = targets != IGNORE_INDEX
    if not scored.any():
        raise ValueError("recall_accuracy: no scored position in targets")
    return (logits.argmax(-1)[scored] == targets[scored]).float().mean()
