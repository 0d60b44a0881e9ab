"""How close the shipped digits models sample to the real digits (README "Digits models").

    OMP_NUM_THREADS=1 python scripts/digits_quality.py [--num-samples 297]

Runs the README's sampling commands (DDPM 100 steps unless noted) with --num-samples equal to
the held-out split (297), then scores each with the independent digits judge (guided.evaluation.judge):
accuracy on the asked class, the judge-space Frechet distance to a reference of 1,000
class-balanced TRAINING digits (guided.evaluation.reference_batch), the mean pixel (real digits: 77) and
the largest difference between a sample's channels (0 = grey, no tint). The floor is the same
distance for the 297 real held-out digits: what real data reach at this sample count. A second
distance is to the held-out digits themselves (as the training probe measures), whose floor is
297 real training digits against them.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sweeps" / "quality"
RUNS = {  # name -> sample_guided.py arguments
    "cond, scale 4 (the README's first command, on ddpm)": "--model cond --scale 4",
    "cond, scale 0": "--model cond --scale 0",
    "uncond, scale 0": "--model uncond --scale 0",
    "uncond, scale 10": "--model uncond --scale 10",
    "cond, classifier-free 2": "--model cond --scale 0 --cfg-scale 2",
    "ncsn, Langevin, scale 2": "--model ncsn --sampler langevin --scale 2",
}


def reference():
    from guided.evaluation.reference_batch import build_reference

    return build_reference("digits", 16, 1000, channels=3, seed=0, progress=False)[0]


def score(images, labels, ref_stats):
    """(FID to the training reference, accuracy, mean pixel, max channel difference, FID to the held-out digits)."""
    from guided.evaluation.judge import load_judge
    from guided.evaluation.metrics import feature_stats, frechet_distance
    from guided.training.probe import judge_fid

    judge = load_judge(16)
    mu, sigma = feature_stats(judge.extract(images)["pool"])
    fid = float(frechet_distance(mu, sigma, *ref_stats))
    acc = judge.accuracy(images, labels) if labels is not None and labels.min() >= 0 else float("nan")
    tint = int(np.abs(images.astype(int) - images.astype(int).mean(-1, keepdims=True)).max())
    return fid, acc, float(images.mean()), tint, judge_fid(images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=297)
    args = p.parse_args(argv)
    from guided.evaluation.judge import digits_data, load_judge, split_indices
    from guided.evaluation.metrics import feature_stats

    ref_stats = feature_stats(load_judge(16).extract(reference())["pool"])
    images, labels = digits_data(16)
    held = split_indices()[1]
    real = np.repeat(images[held], 3, -1)
    from guided.training.probe import fid_floor

    rows = [("real held-out digits (the floor)", len(held), *score(real, labels[held], ref_stats)[:4],
             fid_floor(16, len(held)))]  # against the held-out digits: real training digits are the floor
    for name, cli in RUNS.items():
        out = OUT / "".join(c if c.isalnum() else "_" for c in name)
        if not (out / "samples.npz").exists():
            ddpm = "" if "--sampler" in cli else " --sampler ddpm"  # the paper's sampler unless named
            cmd = f"{sys.executable} sample_guided.py {cli}{ddpm} --num-samples {args.num_samples} --seed 1 --out {out}"
            print("$", cmd, flush=True)
            subprocess.run(shlex.split(cmd), cwd=ROOT, check=True)
        with np.load(out / "samples.npz") as f:
            rows.append((f"`{cli}`", len(f["arr_0"]), *score(f["arr_0"], f["arr_1"], ref_stats)))
    floor, held_floor = rows[0][2], rows[0][6]
    print("| samples | n | judge accuracy | FID to 1,000 training digits (x floor) | FID to the held-out digits (x floor) "
          "| mean pixel | max channel difference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, n, fid, acc, mean, tint, held_fid in rows:
        print(f"| {name} | {n} | {acc:.1%} | {fid:.1f} ({fid / floor:.2f}x) | {held_fid:.1f} ({held_fid / held_floor:.2f}x) "
              f"| {mean:.0f} | {tint} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
