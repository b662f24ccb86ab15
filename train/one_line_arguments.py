"""argparse for every command of the project: a bad argument is one `error:` line and exit status 2,
as every other bad input is (argparse's own error prints its whole usage block first). Imports
nothing heavy, so that the data and plotting commands can use it without torch."""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints `error: ...` on one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)
