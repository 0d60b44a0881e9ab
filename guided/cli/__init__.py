"""Command-line programs: thin argparse layers over the library.

`run_cli(fn)` runs a program's body and turns a GuidedError (bad input) into
one line, `error: <message>`, and exit status 2: never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import GuidedError


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run_cli(fn, *args) -> int:
    try:
        return fn(*args) or 0
    except GuidedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
