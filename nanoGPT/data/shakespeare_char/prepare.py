"""Build the character-level token files of tiny Shakespeare: train.bin, val.bin (uint16 ids) and meta.pkl.

The vocabulary is the sorted set of characters of the whole text (65 for tiny Shakespeare); the first 90% of
the characters are the training split, the last 10% the validation split. meta.pkl holds
``{'vocab_size', 'stoi', 'itos'}`` so that samples can be decoded back to text.

    python -m nanoGPT.data.shakespeare_char.prepare
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from ...atomic import write_atomically

HERE = Path(__file__).resolve().parent
INPUT = HERE / "input.txt"
TRAIN_FRACTION = 0.9


def build_vocab(text: str) -> dict:
    """The char vocabulary: ids in sorted character order."""
    chars = sorted(set(text))
    return {"vocab_size": len(chars), "stoi": {c: i for i, c in enumerate(chars)}, "itos": dict(enumerate(chars))}


def encode(text: str, stoi: dict) -> list[int]:
    unknown = sorted(set(text) - set(stoi))
    if unknown:
        raise ValueError(f"encode: characters {unknown!r} are not in the vocabulary")
    return [stoi[c] for c in text]


def decode(ids, itos: dict) -> str:
    return "".join(itos[int(i)] for i in ids)


def prepare(input_path: Path = INPUT, out_dir: Path = HERE) -> dict:
    """Write train.bin, val.bin and meta.pkl into ``out_dir``; return the meta dict."""
    input_path, out_dir = Path(input_path), Path(out_dir)
    if not input_path.is_file():
        raise FileNotFoundError(f"prepare: no text at {input_path}")
    text = input_path.read_text(encoding="utf-8")
    meta = build_vocab(text)
    if meta["vocab_size"] > np.iinfo(np.uint16).max:
        raise ValueError(f"prepare: {meta['vocab_size']} characters do not fit uint16 ids")
    ids = np.array(encode(text, meta["stoi"]), dtype=np.uint16)
    split = int(TRAIN_FRACTION * len(ids))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Atomic writes: several processes may prepare the data at once, and readers must never see half a file.
    for name, data in (("train.bin", ids[:split].tobytes()), ("val.bin", ids[split:].tobytes()),
                       ("meta.pkl", pickle.dumps(meta))):
        write_atomically(out_dir / name, lambda f, data=data: f.write(data))
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", type=Path, default=INPUT, help="the text file")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for train.bin, val.bin, meta.pkl")
    args = parser.parse_args(argv)
    meta = prepare(args.input, args.out)
    n_train = (args.out / "train.bin").stat().st_size // 2
    n_val = (args.out / "val.bin").stat().st_size // 2
    print(f"vocab size {meta['vocab_size']}; train {n_train:,} tokens, val {n_val:,} tokens -> {args.out}")


if __name__ == "__main__":
    main()
