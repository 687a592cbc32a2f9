"""Character-level tiny Shakespeare: the 90/10 split, the vocabulary and the batches."""
import numpy as np
import pytest
import torch

from nanoGPT.data.shakespeare_char.prepare import INPUT, build_vocab, decode, encode, prepare
from nanoGPT.data_loader import get_batch, load_meta, load_split


def test_splits_cover_the_text_90_10():
    text = INPUT.read_text(encoding="utf-8")
    train, val = load_split("train"), load_split("val")
    assert len(train) + len(val) == len(text)
    assert len(train) == int(0.9 * len(text))
    meta = load_meta()
    assert meta["vocab_size"] == 65  # tiny Shakespeare's character set
    assert decode(train[:200], meta["itos"]) == text[:200]
    assert decode(val[-200:], meta["itos"]) == text[-200:]


def test_prepare_writes_to_a_folder(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("abcabcabca")
    meta = prepare(src, tmp_path)
    assert meta["stoi"] == {"a": 0, "b": 1, "c": 2}
    assert np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert np.fromfile(tmp_path / "val.bin", dtype=np.uint16).tolist() == [0]


def test_encode_refuses_unknown_characters():
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("abz", build_vocab("ab")["stoi"])


def test_get_batch_targets_are_the_next_tokens():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, 5, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 7) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # consecutive ids: the target is the next id
    x2, _ = get_batch(data, 5, 7, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_bad_split_and_short_data():
    with pytest.raises(ValueError, match="split"):
        load_split("test")
    with pytest.raises(ValueError, match="block_size"):
        get_batch(np.arange(5, dtype=np.uint16), 2, 8, torch.Generator())
