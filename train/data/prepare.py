"""Command line for preparing a dataset; the work is done by `prepare_dataset` in preparation.py.

    python -m train.data.prepare [--vocab-size N] [--out DIR] [--text-field F] [--val-fraction X] [FILES...]

With no FILES the corpus embedded in Python is used. Prints the prepared directory and its token
counts; bad input prints a one-line error and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from train.data.layout import META_FILENAME, SPLITS
from train.data.preparation import EMBEDDED_SOURCE, prepare_dataset
from train.one_line_arguments import ArgumentParser

__all__ = ["main", "prepare_dataset"]

# The same default as the training config's data.cache_dir, so both find the same prepared datasets.
DEFAULT_CACHE_DIR = ".cache/data"


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m train.data.prepare",
        description="Tokenize a corpus into cached webdataset shards. "
        "With no FILES, uses the corpus embedded in Python.",
    )
    parser.add_argument("files", nargs="*", metavar="FILES", help=".txt (one document each) or .jsonl files")
    parser.add_argument("--out", default=DEFAULT_CACHE_DIR, help=f"cache directory (default: {DEFAULT_CACHE_DIR})")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--tokens-per-sample", type=int, default=65536)
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation document split")
    arguments = parser.parse_args(argv)
    try:
        directory = prepare_dataset(
            arguments.files or EMBEDDED_SOURCE,
            arguments.out,
            vocab_size=arguments.vocab_size,
            val_fraction=arguments.val_fraction,
            tokens_per_sample=arguments.tokens_per_sample,
            text_field=arguments.text_field,
            seed=arguments.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = json.loads((directory / META_FILENAME).read_text(encoding="utf-8"))
    print(directory)
    for split in SPLITS:
        print(f"{split}: {meta['splits'][split]['num_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
