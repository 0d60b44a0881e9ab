"""Render the fault-injection report of the tests as the Markdown tables of docs/project/faults.md.

    GUIDED_FAULT_REPORT=fault_report.json OMP_NUM_THREADS=1 \
        python -m pytest -q tests/test_faults.py tests/test_bad_input.py tests/test_diffusers.py
    python scripts/fault_table.py fault_report.json --page docs/project/faults.md

Every row comes from a test that injected the fault or fed the bad input and checked the outcome
(tests/fault_harness.py writes the report); nothing here is typed by hand. Without --page the
tables are printed; with it they replace what lies between the page's two markers (BEGIN, END).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COMMANDS = ["train_diffusion.py", "train_classifier.py", "sample_guided.py", "python -m guided.cli.sweep", "guided-demo",
            "python -m guided.cli.evaluate", "python -m guided.cli.reference_batch", "python -m guided.cli.plots",
            "python -m guided.cli.conformance"]
FAULT_ORDER = ["kill_training", "sigint_training", "divergence", "disk_full_real", "disk_ENOSPC", "disk_torch_runtime",
               "disk_EACCES", "disk_EROFS", "two_trainers", "two_rank0", "disk_samples", "nonfinite_samples",
               "kill_sampling", "sigterm_sampling", "two_samplers"]


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def code(text) -> str:
    text = cell(text)
    return f"`{text}`" if "`" not in text else text


def render(report: dict) -> str:
    out = []
    faults = report.get("faults", {})
    if faults:
        keys = sorted(faults, key=lambda k: (FAULT_ORDER.index(k) if k in FAULT_ORDER else len(FAULT_ORDER), k))
        out += ["| fault | how it was injected | times | what survived |", "| --- | --- | --- | --- |"]
        for k in keys:
            r = faults[k]
            out.append(f"| {cell(r['fault'])} | {cell(r['injected'])} | {r['times']} | {cell(r['survived'])} |")
        out.append("")
    bad = report.get("bad_input", {})
    if bad:
        rows = sorted(bad.values(), key=lambda r: (COMMANDS.index(r["command"]) if r["command"] in COMMANDS
                                                   else len(COMMANDS), r["given"]))
        out += [f"{len(rows)} bad inputs tried; none ends in a traceback:", "",
                "| command | bad input | exit | what it gets |", "| --- | --- | --- | --- |"]
        for r in rows:
            message = code(r["message"]) if r["message"].startswith("error: ") else cell(r["message"])
            out.append(f"| {cell(r['command'])} | {cell(r['given'])} | {r['exit']} | {message} |")
    return "\n".join(out)


BEGIN = "<!-- fault tables: written by scripts/fault_table.py, do not edit by hand -->"
END = "<!-- end of the fault tables -->"


def into_page(page: Path, tables: str) -> None:
    """Replace the text between the page's BEGIN and END markers with the tables."""
    text = page.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{page} does not hold the markers {BEGIN!r} and {END!r} once each, in that order")
    head, rest = text.split(BEGIN)
    page.write_text(head + BEGIN + "\n\n" + tables + "\n\n" + END + rest.split(END, 1)[1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    page = None
    if len(argv) == 3 and argv[1] == "--page":
        argv, page = argv[:1], Path(argv[2])
    if len(argv) != 1:
        print("usage: python scripts/fault_table.py REPORT.json [--page docs/project/faults.md]", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        return 2
    if page is None:
        print(render(report))
        return 0
    try:
        into_page(page, render(report))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the fault tables into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
