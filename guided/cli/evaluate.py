"""Evaluate a sample batch against a reference batch: FID, sFID, IS, precision, recall.

    python -m guided.cli.evaluate SAMPLES.npz [SAMPLES2.npz ...] REFERENCE.npz
        [--features auto|inception|dinov2|digits] [--inception-weights PATH] [--dinov2-weights PATH]
        [--batch-size N] [--json OUT]

The files use the ADM paper's layout: `arr_0` uint8 N x H x W x C (C = 3, or 1),
optional `arr_1` integer labels. The metrics are those of openai/guided-diffusion's
`evaluations/evaluator.py` (guided.evaluation.evaluate, guided.evaluation.metrics), plus
FD-DINOv2; each is printed with the sample count behind it, and distances from too few
images come with a warning. Several sample files (one per seed) also give the mean, std,
min and max of every metric. Reference features and statistics are cached next to the
reference file as REF.<features>.stats.npz and redone when the reference file (size,
mtime) or the feature network changes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from guided.cli import Parser, run_cli
from guided.cli.evaluation_options import add_feature_options, auto_features
from guided.errors import GuidedError
from guided.evaluation.evaluate import evaluate_files, format_result, format_summary
from guided.evaluation.features import FEATURES
from guided.files import atomic_write


def build_parser() -> Parser:
    p = Parser(prog="python -m guided.cli.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", nargs="+", help="sample batch .npz (arr_0: uint8 N x H x W x C); several files "
                                              "(one per seed) also give the mean, std, min and max")
    p.add_argument("reference", help="reference batch .npz; statistics are cached next to it")
    add_feature_options(p, default="auto", choices=("auto", *FEATURES),
                        features_help="feature network: the paper's Inception-v3, DINOv2 ViT-L/14 (FD-DINOv2; pip "
                                      "install '.[dinov2]'), or the digits judge; auto: digits for grey images of at "
                                      "most 32 px (the digits), else inception")
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference statistics cache")
    p.add_argument("--device", help="torch device for the feature network (default: cuda if available)")
    return p


def _report(runs: list[dict], samples: list[str], reference: str) -> dict:
    """Print one run's metrics, or the table of several; return what --json writes."""
    if len(runs) == 1:
        res = runs[0]
        print(f"{samples[0]}: {res['num_samples']} samples against {reference}: "
              f"{res['num_reference']} images, {res['features']} features ({res['feature_dim']}-d)")
        print("\n".join(format_result(res)))
        return res
    lines, summary = format_summary(runs, samples)
    print(f"{len(runs)} sample files against {reference} ({runs[0]['features']} features); "
          f"samples per file: {', '.join(str(r['num_samples']) for r in runs)}")
    print("\n".join(lines))
    return {"runs": [dict(r, file=f) for r, f in zip(runs, samples)], "summary": summary}


def _run(args) -> int:
    if args.features == "auto":
        args.features = auto_features(*args.samples, args.reference, inception_weights=args.inception_weights)
    runs = evaluate_files(args.samples, args.reference, args.features, inception_weights=args.inception_weights,
                          dinov2_weights=args.dinov2_weights, batch_size=args.batch_size,
                          use_cache=not args.no_cache, device=args.device)
    res = _report(runs, args.samples, args.reference)
    for w in dict.fromkeys(w for r in runs for w in r["warnings"]):
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        try:
            atomic_write(Path(args.json), lambda f: f.write((json.dumps(res, indent=2) + "\n").encode()))
        except OSError as e:
            raise GuidedError(f"cannot write {args.json}: {e.strerror}") from None
    return 0


def main(argv=None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
