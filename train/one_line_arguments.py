"""argparse for every command of the project: a bad argument is one `error:` line and exit status 2,
as every other bad input is (argparse's own error prints its whole usage block first). Imports
nothing heavy, so that the data and plotting commands can use it without torch."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints `error: ...` on one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parsed_as(text: str, convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Any:
    """`convert(text)` when it converts and is `valid`, else argparse's one-line error naming `expected`
    (an argument `type=`: argparse puts the flag's name in front)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return parsed_as(text, int, lambda value: value >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return parsed_as(text, int, lambda value: value >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return parsed_as(text, float, lambda value: math.isfinite(value) and value > 0, "a finite number > 0")
