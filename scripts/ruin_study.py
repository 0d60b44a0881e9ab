"""What a ruined batch looks like: the shipped digits models across classifier-guidance scales.

    OMP_NUM_THREADS=1 python scripts/ruin_study.py [--num-samples 8] [--steps 20] [--json out.json]

For each model (cond, uncond), sampler (ddpm, ddim) and scale (0 .. 1e6) it draws one batch
(seed 0, class 3, sample_guided.py's settings but the steps) and prints, per batch: the share of pixels at 0 and at 255, the share of
neighbouring pixel pairs that jump between the two extremes (a 0 next to a 255: speckle), the
verdict of guided.generation.images.ruin (the run's warning), and how often the independent judge
(guided.evaluation.judge) recognises the asked digit. The real digits (the training images)
come first, as a reference. The README's "Ruined batches" table is this script's output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guided.evaluation.judge import digits_data, load_judge  # noqa: E402
from guided.generation import SampleOptions, load_pipeline, sample_batch, to_uint8  # noqa: E402
from guided.generation.images import image_statistics, ruin  # noqa: E402
from guided.samplers.registry import clip_guided_samplers  # noqa: E402

SCALES = (0, 1, 4, 10, 30, 100, 1e3, 1e4, 1e5, 1e6)


def row(name, images, labels, judge) -> dict:
    stats = image_statistics(images)
    return {"batch": name, **stats, "judge": judge.accuracy(images, labels), "warned": ruin(images) is not None}


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--num-samples", type=int, default=8)
    a.add_argument("--steps", default="20")
    a.add_argument("--json", default=None)
    args = a.parse_args(argv)
    judge = load_judge(16)
    real, labels = digits_data(16)
    rows = [row("real digits (1,797)", np.repeat(real, 3, axis=-1), labels, judge)]
    for model in ("cond", "uncond"):
        p = load_pipeline(model)
        for sampler in ("ddpm", "ddim"):
            for scale in SCALES:
                opts = SampleOptions(sampler=sampler, steps=args.steps, scale=float(scale),
                                     clip_guided=sampler in clip_guided_samplers())
                y = np.full(args.num_samples, 3)
                x = sample_batch(p, y, np.arange(args.num_samples), opts)
                if not np.isfinite(x.numpy()).all():
                    rows.append({"batch": f"{model} {sampler} scale {scale:g}", "nonfinite": True})
                    continue
                rows.append(row(f"{model} {sampler} scale {scale:g}", to_uint8(x), y, judge))
                print(rows[-1], flush=True)
    print("\n| batch | at 0 | at 255 | speckle | judge | warned |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r.get("nonfinite"):
            print(f"| {r['batch']} | NaN / inf | | | |")
            continue
        print(f"| {r['batch']} | {r['black']:.1%} | {r['white']:.1%} | {r['speckle']:.2%} | {r['judge']:.0%} | "
              f"{'yes' if r['warned'] else ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
