"""Command-line programs: thin argparse layers over the library.

`run_cli(fn)` runs a program's body and turns a GuidedError (bad input) into
one line, `error: <message>`, and exit status 2: never a traceback. SIGTERM
and Ctrl-C stop it the same way (exit 143 and 130), after the `finally`
blocks on the way out have released locks and closed files (guided/signals.py).
"""
from __future__ import annotations

import argparse
import sys

from guided.errors import GuidedError
from guided.signals import Stopped, sigterm_raises, stop_status


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one) and keeps the description's lines."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "(default" in (action.help or ""):  # none to show, or the help says it already
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2; a command given no
    arguments at all that needs some prints its usage above that line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._bare = False

    def parse_args(self, args=None, namespace=None):
        self._bare = not (sys.argv[1:] if args is None else list(args))
        return super().parse_args(args, namespace)

    def error(self, message):
        self.exit(2, (self.format_usage() if self._bare else "") + f"error: {message} (see --help)\n")


def error_line(text: str) -> None:
    """Print `error: text` in one write: processes launched together share one stderr, and
    print's two writes (text, then newline) let their lines interleave."""
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def run_cli(fn, *args) -> int:
    try:
        with sigterm_raises():
            return fn(*args) or 0
    except GuidedError as e:
        error_line(str(e))
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        code, line = stop_status(e)
        error_line(line)
        return code
