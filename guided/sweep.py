"""Guidance-scale sweeps: sample at each scale, evaluate, tabulate and plot.

    python -m guided.sweep --model uncond --scales 0,0.5,1,2,4,10 --num-samples 1000 --out sweeps/uncond

For each scale the samples go to OUT/scale_<s>/ (samples.npz, grid.png);
the metrics (FID, sFID, IS, precision, recall, and for digits the share the
independent judge recognises as the asked class) go to OUT/results.csv and
OUT/results.json, and their curves against the scale to OUT/sweep.png. A
sweep that was interrupted resumes: scales already evaluated are kept, and a
scale whose sampling stopped part-way keeps its finished batches.
"""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from .cli import Parser, run_cli
from .cli.sample import _scales, add_model_args, add_sampler_args, load_pipeline, options, parse_classes, processes
from .errors import GuidedError
from .evaluate import evaluate
from .generate import generate, write_output

METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "judge_accuracy")


def build_parser() -> Parser:
    p = Parser(prog="python -m guided.sweep", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--scales", type=_scales, default=[0, 0.5, 1, 2, 4, 10], help="guidance scales to sample")
    add_sampler_args(p)
    p.add_argument("--reference", default="digits",
                   help="reference batch (.npz in the paper's layout), or 'digits' for the digits data set")
    p.add_argument("--features", choices=("digits", "inception"), default=None,
                   help="feature network (default: digits for the digits reference, else inception)")
    p.add_argument("--inception-weights", default=None, help="weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--out", default="sweep", help="sweep folder")
    return p


def digits_reference(path: Path, image_size: int, channels: int) -> Path:
    """All 1,797 digits at the model's resolution, as a reference batch."""
    from .evaluate import write_npz
    from .judge import digits_data

    if not path.exists():
        images, labels = digits_data(image_size)
        write_npz(path, np.repeat(images, channels, axis=-1) if channels == 3 else images, labels)
    return path


def load_results(out: Path) -> dict[str, dict]:
    f = out / "results.json"
    return {row["scale"]: row for row in json.loads(f.read_text())} if f.exists() else {}


def save_results(out: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: float(r["scale"]))
    write_output(out / "results.json", lambda f: f.write((json.dumps(rows, indent=1) + "\n").encode()))

    def write_csv(f):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=["scale", *[m for m in METRICS if m in rows[0]], "num_samples"],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        f.write(text.getvalue().encode())
    write_output(out / "results.csv", write_csv)
    plot(out / "sweep.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in rows[0]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3))
    scales = [float(r["scale"]) for r in rows]
    for ax, m in zip(np.atleast_1d(axes), metrics):
        ax.plot(scales, [r[m] for r in rows], "o-")
        ax.set_xlabel("guidance scale")
        ax.set_title(m.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_output(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def sweep(args) -> list[dict]:
    device, rank, world, barrier = processes(args)
    pipeline = load_pipeline(args, device)
    classes = parse_classes(args.classes, pipeline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c, size, _ = pipeline.shape()
    reference = Path(args.reference) if args.reference != "digits" else digits_reference(
        out / f"reference_digits_{size}.npz", size, c)
    if not reference.exists():
        raise GuidedError(f"reference batch {reference} does not exist")
    features = args.features or ("digits" if args.reference == "digits" else "inception")
    done = load_results(out)
    for scale in args.scales:
        key = f"{scale:g}"
        if key in done:
            continue
        folder = out / f"scale_{key}"
        npz = folder / "samples.npz"
        if not npz.exists():
            generate(pipeline, folder, classes=classes, num_samples=args.num_samples, batch_size=args.batch_size,
                     seed=args.seed, opts=options(args, scale), device=device, rank=rank, world_size=world,
                     barrier=barrier, settings={"model": args.model, "classifier": args.classifier})
        if rank == 0:
            metrics = evaluate(npz, reference, features, inception_weights=args.inception_weights, device=device)
            done[key] = {"scale": key, **{m: float(metrics[m]) for m in METRICS if m in metrics},
                         "num_samples": int(metrics["num_samples"])}
            save_results(out, list(done.values()))
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in done[key].items()))
    return sorted(done.values(), key=lambda r: float(r["scale"]))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda a: sweep(a) and 0, args)


if __name__ == "__main__":
    sys.exit(main())
