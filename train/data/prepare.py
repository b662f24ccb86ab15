"""Command line for preparing a dataset; the work is done by `prepare_dataset` in preparation.py.

    python -m train.data.prepare [--vocab-size N] [--out DIR] [--text-field F] [--val-fraction X] [FILES...]

With no FILES the corpus embedded in Python is used. Prints the prepared directory and its token
counts; bad input prints a one-line error and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from train.data.layout import META_FILENAME, SPLITS
from train.data.preparation import EMBEDDED_SOURCE, prepare_dataset
from train.data.split import MAX_TRAINING_VAL_FRACTION
from train.data.tokenizer import MIN_TRAINING_VOCAB_SIZE
from train.one_line_arguments import ArgumentParser, non_negative_int, parsed_as, positive_int
from train.output_path import output_problem

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
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE_DIR, help=f"cache directory (default: {DEFAULT_CACHE_DIR})")
    # The bounds training takes (data.vocab_size, data.val_fraction): a dataset outside them could
    # be prepared but never trained on.
    parser.add_argument("--vocab-size", type=_vocab_size, default=4096, help=f"at least {MIN_TRAINING_VOCAB_SIZE}")
    parser.add_argument("--val-fraction", type=_val_fraction, default=0.05,
                        help=f"share of documents held out, above 0 and below {MAX_TRAINING_VAL_FRACTION}")
    parser.add_argument("--tokens-per-sample", type=positive_int, default=65536)
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the train/validation document split")
    arguments = parser.parse_args(argv)
    if problem := output_problem(arguments.out, "--out", folder=True):
        parser.error(problem)  # before the corpus is read
    try:
        directory = prepare_dataset(
            arguments.files or EMBEDDED_SOURCE,
            arguments.out,
            vocab_size=arguments.vocab_size,
            val_fraction=arguments.val_fraction,
            tokens_per_sample=arguments.tokens_per_sample,
            text_field=arguments.text_field,
            seed=arguments.seed,
            cache_dir_setting="--out",
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    meta = json.loads((directory / META_FILENAME).read_text(encoding="utf-8"))
    print(directory)
    for split in SPLITS:
        print(f"{split}: {meta['splits'][split]['num_tokens']} tokens")
    return 0


def _vocab_size(text: str) -> int:
    return parsed_as(text, int, lambda value: MIN_TRAINING_VOCAB_SIZE <= value < 2**32,
                     f"an integer from {MIN_TRAINING_VOCAB_SIZE} to 2**32 - 1")


def _val_fraction(text: str) -> float:
    return parsed_as(text, float, lambda value: 0 < value < MAX_TRAINING_VAL_FRACTION,
                     f"a number above 0 and below {MAX_TRAINING_VAL_FRACTION}")


if __name__ == "__main__":
    sys.exit(main())
