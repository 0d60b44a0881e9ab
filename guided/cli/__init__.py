"""Command-line programs: thin argparse layers over the library.

`run_cli(fn)` runs a program's body and turns a GuidedError (bad input) into
one line, `error: <message>`, and exit status 2: never a traceback. SIGTERM
and Ctrl-C stop it the same way (exit 143 and 130), after the `finally`
blocks on the way out have released locks and closed files.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from guided.errors import GuidedError

STOPPED_BY = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number


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


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM (as KeyboardInterrupt is by SIGINT)."""


def _raise_stopped(signum, frame):
    raise Stopped()


def run_cli(fn, *args) -> int:
    old = signal.signal(signal.SIGTERM, _raise_stopped) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return fn(*args) or 0
    except GuidedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped:
        print("error: stopped by SIGTERM; what was finished is kept (rerun the same command to continue)",
              file=sys.stderr)
        return STOPPED_BY[signal.SIGTERM]
    except KeyboardInterrupt:
        print("error: interrupted; what was finished is kept (rerun the same command to continue)", file=sys.stderr)
        return STOPPED_BY[signal.SIGINT]
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
