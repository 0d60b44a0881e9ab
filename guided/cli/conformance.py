"""Check the project against numbers produced by the paper's released code.

    python -m guided.cli.conformance ../shared/conformance/*.pt

Each file (format: ../shared/conformance/README.md) holds flags, weights,
inputs and reference outputs of one kind: `unet`, `classifier`, `schedule` or
`guided`. The networks are rebuilt from the file's flags with the project's
own code, every stored output is recomputed (guided.evaluation.conformance),
and a table of relative errors ||ours - ref|| / ||ref|| is printed. Exit
status 1 if any row is over its tolerance (1e-4; 1e-3 for the full DDIM
loop), 2 for a file it cannot read.
"""
from __future__ import annotations

import sys

import torch

from guided.cli import Parser, error_line
from guided.errors import GuidedError
from guided.evaluation.conformance import check_file, format_table


def build_parser() -> Parser:
    p = Parser(prog="python -m guided.cli.conformance", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="conformance .pt files")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(True)
    rows = []
    try:
        for f in args.files:
            rows += check_file(f)
    except GuidedError as e:  # the rows checked so far, then the one line
        if rows:
            print(format_table(rows))
        error_line(str(e))
        return 2
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} quantities within tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
