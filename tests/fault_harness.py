"""Fault injection helpers for tests/test_faults.py and tests/test_bad_input.py.

* `record_fault` / `record_bad_input` add one case to the JSON report named by
  $GUIDED_FAULT_REPORT (nothing is written when it is unset); scripts/fault_table.py
  renders that report as the README's Markdown table.
* `Child` runs a command-line main() in a forked process (the parent has torch and the
  models imported already, so a child starts in a fraction of a second), its output in a
  log file, so the harness can SIGKILL or SIGTERM it at any moment.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import time
from pathlib import Path

REPORT_ENV = "GUIDED_FAULT_REPORT"
REPO = Path(__file__).resolve().parents[1]


def _update_report(section: str, key: str, row: dict) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    data.setdefault(section, {})[key] = row
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def record_fault(key: str, fault: str, injected: str, times: int, survived: str) -> None:
    _update_report("faults", key, dict(fault=fault, injected=injected, times=times, survived=survived))


def record_bad_input(key: str, command: str, given: str, exit_code: int, message: str) -> None:
    _update_report("bad_input", key, dict(command=command, given=given, exit=exit_code, message=message))


def one_error_line(err: str) -> str:
    """The single `error: ...` line of a command's stderr; fails on a traceback or extra lines."""
    assert "Traceback" not in err, err
    # progress bars redraw with \r and cursor moves; every other line must be the one error
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "\n", err).replace("\r", "\n").splitlines()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def _child_main(target: str, argv: list[str], log: str, env: dict) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(env)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    module, name = target.split(":")
    import importlib

    code = getattr(importlib.import_module(module), name)(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def sample_held(argv: list[str]) -> int:
    """sample_guided.py's main, holding its folder's lock before the first batch until the file named by
    GUIDED_TEST_RELEASE exists (60 s at most): a second run is then sure to meet the lock, whatever the
    machine's speed."""
    import guided.generation.writer as writer
    from guided.cli.sample import main

    release, draw = Path(os.environ["GUIDED_TEST_RELEASE"]), writer.sample_batch

    def held(*args, **kw):
        deadline = time.time() + 60
        while not release.exists() and time.time() < deadline:
            time.sleep(0.01)
        return draw(*args, **kw)
    writer.sample_batch = held
    return main(argv)


class Child:
    """main(argv) of `target` ("module:function") in a forked process, output appended to `log`."""

    def __init__(self, target: str, argv: list[str], log: Path, env: dict | None = None):
        self.log = Path(log)
        self.start_offset = self.log.stat().st_size if self.log.exists() else 0
        ctx = multiprocessing.get_context("fork")
        self.proc = ctx.Process(target=_child_main, args=(target, list(argv), str(log), dict(env or {})))
        self.started = time.time()
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self, sig: int) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            raise AssertionError(f"child {self.pid} did not finish in {timeout}s")
        return self.proc.exitcode

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            f.seek(self.start_offset)
            return f.read()


def wait_for(predicate, timeout: float = 30, poll: float = 0.002, child: Child | None = None):
    """Poll until predicate() is truthy (returns it), the child exits (returns None) or timeout (fails)."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if child is not None and not child.alive():
            return None
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
