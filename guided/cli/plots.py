"""Figures of guidance sweeps, and the data behind them.

    python -m guided.cli.plots SWEEP_DIR [SWEEP_DIR ...] --out tradeoff.png [--labels A,B,...]

Draws the paper's trade-off figures (Dhariwal & Nichol 2021, fig. 5: varying the
classifier scale), precision against recall and FID against Inception Score, one curve
per sweep folder of python -m guided.cli.sweep (guided.evaluation.plots.tradeoff); the
figure's numbers go to OUT.csv and OUT.json beside the PNG.
"""
from __future__ import annotations

import sys
from pathlib import Path

from guided.cli import Parser, run_cli
from guided.errors import GuidedError
from guided.evaluation.plots import tradeoff


def build_parser() -> Parser:
    p = Parser(prog="python -m guided.cli.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", help="sweep folders of python -m guided.cli.sweep (one per method)")
    p.add_argument("--out", default="tradeoff.png", help="the figure; its data go beside it as .csv and .json")
    p.add_argument("--labels", default=None, help="comma list of method names (default: the folder names)")
    return p


def _run(args) -> int:
    for folder in map(Path, args.sweeps):
        if not folder.is_dir():
            raise GuidedError(f"{folder} " + ("is a file" if folder.exists() else "does not exist")
                              + ": give sweep folders of python -m guided.cli.sweep")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    for w in tradeoff(args.sweeps, Path(args.out), labels):
        print(f"warning: {w}", file=sys.stderr)
    out = Path(args.out)
    print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.json')}")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
