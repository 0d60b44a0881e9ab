"""The guidance study of README "Which guidance wins": every method on the shipped digits models.

    OMP_NUM_THREADS=1 python scripts/guidance_study.py [--num-samples 200] [--jobs 2] [--samplers dpm++,ddpm]

Each method is one `python -m guided.cli.sweep` folder (sweeps/study/<sampler>/<method>) over its own
scale, at the same steps for every method of a sampler (dpm++ quad25: all nine methods; ddpm 100: the
six that differ most, for CPU time), scored in the
digits judge's feature space against 1,000 class-balanced training digits. Then it prints the
README table (each method's best FID and the judge accuracy, precision and recall there) and
draws every method's trade-off curves into docs/guidance_study.png (guided.cli.plots, with its data
beside it). Reruns reuse finished sweeps.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_INTERVAL = "0.28,5.42"  # Kynkaanniemi et al. 2024's interval for EDM2-S (sigma, data in [-1, 1])
CLS = "0,1,2,4,8"
# name -> (sweep arguments, samplers it applies to)
METHODS = {
    "classifier (paper)": ("--model uncond --no-calibration --scales " + CLS, ("dpm++", "ddpm")),
    "classifier, calibrated": ("--model uncond --scales " + CLS, ("dpm++",)),
    "classifier, interval": (f"--model uncond --interval {PUBLISHED_INTERVAL} --scales " + CLS, ("dpm++", "ddpm")),
    "classifier, DDPM score form": ("--model uncond --ddpm-form score --scales " + CLS, ("ddpm",)),
    "x0-classifier": ("--model uncond --sweep x0_scale=" + CLS, ("dpm++", "ddpm")),
    "classifier-free": ("--model cond --sweep cfg_scale=1,1.5,2,3,4", ("dpm++", "ddpm")),
    "classifier-free, interval": (f"--model cond --cfg-interval {PUBLISHED_INTERVAL} --sweep cfg_scale=1,1.5,2,3,4",
                                  ("dpm++",)),
    "autoguidance": ("--model cond --sweep autoguide_scale=1,1.5,2,3,4", ("dpm++", "ddpm")),
    "classifier + autoguidance": ("--model uncond --autoguide-scale 2 --scales " + CLS, ("dpm++",)),
}
STEPS = {"dpm++": "quad25", "ddpm": "100"}


def folder(sampler: str, method: str) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in method).strip("_")
    return ROOT / "sweeps" / "study" / sampler.replace("+", "p") / slug


def run(sampler: str, method: str, n: int) -> Path:
    out = folder(sampler, method)
    cmd = [sys.executable, "-m", "guided.cli.sweep", *METHODS[method][0].split(), "--sampler", sampler,
           "--steps", STEPS[sampler], "--num-samples", str(n), "--batch-size", str(n), "--out", str(out)]
    print("$", " ".join(cmd[1:]), flush=True)
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    return out


def best(out: Path) -> dict:
    """The value with the lowest mean FID and the metrics there."""
    res = json.loads((out / "results.json").read_text())
    param, rows = res["param"], res["summary"]
    row = min(rows, key=lambda r: r["fid"]["mean"])
    base = next((r for r in rows if r[param] in (0, 1) and r[param] == min(x[param] for x in rows)), rows[0])
    return {"param": param, "value": row[param], "base_fid": base["fid"]["mean"], "samples": row["num_samples"],
            **{m: row[m]["mean"] for m in ("fid", "judge_accuracy", "precision", "recall") if m in row}}


def table(samplers) -> str:
    lines = ["| sampler | method | swept | best at | FID (unguided) | judge accuracy | precision | recall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for sampler in samplers:
        for method, (_, which) in METHODS.items():
            out = folder(sampler, method)
            if sampler not in which or not (out / "results.json").is_file():
                continue
            b = best(out)
            lines.append(f"| {sampler} {STEPS[sampler]} | {method} | {b['param']} | {b['value']:g} | "
                         f"**{b['fid']:.1f}** ({b['base_fid']:.1f}) | {b.get('judge_accuracy', float('nan')):.1%} | "
                         f"{b['precision']:.2f} | {b['recall']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--jobs", type=int, default=2, help="sweeps run at once (one CPU thread each)")
    p.add_argument("--samplers", default="dpm++,ddpm")
    p.add_argument("--report-only", action="store_true", help="table and figures of the sweeps already run")
    args = p.parse_args(argv)
    samplers = args.samplers.split(",")
    todo = [(s, m) for s in samplers for m, (_, which) in METHODS.items() if s in which]
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda sm: run(*sm, args.num_samples), todo))
    print(table(samplers))
    for s in samplers:
        dirs = [str(folder(s, m)) for m, (_, which) in METHODS.items() if s in which]
        labels = ",".join(m.replace(",", "") for m, (_, which) in METHODS.items() if s in which)  # comma-separated
        subprocess.run([sys.executable, "-m", "guided.cli.plots", *dirs, "--out",
                        str(ROOT / "docs" / f"guidance_study_{s.replace('+', 'p')}.png"), "--labels", labels],
                       cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
