"""Train the small committed GPT (``nanoGPT/pretrained/shakespeare_small.pth`` and its manifest) again.

    python -m nanoGPT.make_small_model         # about a minute on a 2-core CPU

The comparison's ``--quick`` mode takes real Shakespeare q/k/v from this model (``nanoGPT.qkv_source``), so that
a fresh clone trains nothing; see ``nanoGPT.quick_model`` for its size and the manifest.
"""
from __future__ import annotations

import argparse
import json

from .quick_model import SMALL_MODEL, build_small_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    manifest = build_small_model(SMALL_MODEL, progress=not args.no_progress)
    print(json.dumps(manifest, indent=1))
    return manifest


if __name__ == "__main__":
    main()
