"""Training recipes on the digits, judged by the probe: FID to the held-out digits over steps and CPU time.

    python scripts/training_recipes_study.py [--runs runs/recipes] [--until STAGE]   # train (resumable)
    python scripts/training_recipes_study.py --report                               # figure and table
    python scripts/training_recipes_study.py --pick-ema RUN_DIR [--sigma-rels ...]  # probe post-hoc EMAs

Every run is configs/digits.yaml (the shipped `cond` model's network, batch, lr and EMA) with one recipe's
train.objective settings (guided.diffusion.recipes) and a seed, probed every 500 steps (300 samples,
guided.training.probe). The plan runs in stages, most informative first: seed 0 of each new recipe to
4,000 steps (a third of the shipped 12,000), then seed 1 of every recipe, then all to 12,000; the runs of
a stage advance together, 1,000 steps at a time, so that whatever has finished compares equal steps. Each run
checkpoints every 500 steps; rerunning the script continues where it stopped. One JSON line per probe
goes to docs/training_recipes_study.jsonl (recipe, seed, step, FID, floor, training CPU seconds).
The paper's seed 0 is the shipped run itself (docs/digits_training.csv, probed every 1,000 steps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "docs" / "training_recipes_study.jsonl"
RECIPES = {  # name -> train.objective overrides on configs/digits.yaml
    "paper": [],
    "min_snr": ["train.objective.weighting=min_snr", "train.objective.min_snr_gamma=5"],
    "edm": ["train.objective.weighting=edm", "train.objective.schedule_sampler=lognormal",
            "train.objective.prediction=edm"],
}
STAGES = [  # (recipe, seed, steps), in order: runs of a seed advance together, 1,000 steps at a time
    *[(r, 0, n) for n in (1000, 2000, 3000, 4000) for r in ("min_snr", "edm")],
    *[(r, 1, n) for n in (1000, 2000, 3000, 4000) for r in RECIPES],
    *[(r, s, 12000) for s in (0, 1) for r in RECIPES if (r, s) != ("paper", 0)],
]
SHIPPED_FID, TARGET_FACTOR = 11.7, 1.2


def run_config(recipe: str, seed: int, steps: int, runs: Path):
    from guided.config import load_config

    return load_config(ROOT / "configs" / "digits.yaml", RECIPES[recipe] + [
        f"train.seed={seed}", f"train.steps={steps}", f"train.out_dir={runs / f'{recipe}_s{seed}'}",
        "train.probe.every=500", "train.save_every=500", "train.keep_checkpoints=1", "train.snapshot_steps=[]"])


def timed_trainer(recipe: str, seed: int, log: Path):
    """A DiffusionTrainer that appends each probe, with the CPU seconds spent training so far, to `log`."""
    from guided.training.diffusion import DiffusionTrainer

    class Timed(DiffusionTrainer):
        def build(self, resume):
            super().build(resume)
            self.cpu_file = self.out_dir / "train_cpu_s.json"
            saved = json.loads(self.cpu_file.read_text()) if self.cpu_file.exists() else {}
            self.cpu_before = float(saved.get(str(self.step), 0.0))  # CPU spent before the checkpoint resumed
            self.cpu_start, self.probe_cpu = time.process_time(), 0.0

        def train_cpu(self) -> float:
            return self.cpu_before + time.process_time() - self.cpu_start - self.probe_cpu

        def probe(self):
            start = time.process_time()
            super().probe()
            self.probe_cpu += time.process_time() - start
            rows = [json.loads(x) for x in (self.out_dir / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in rows if r.get("step") == self.step and "probe_fid" in r][-1]
            with open(log, "a") as f:
                f.write(json.dumps({"recipe": recipe, "seed": seed, "step": self.step, "fid": last["probe_fid"],
                                    "fid_null": last.get("probe_fid_null"), "acc": last.get("probe_acc"),
                                    "floor": last["probe_fid_floor"], "train_cpu_s": round(self.train_cpu(), 1),
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

        def save(self):
            super().save()
            saved = json.loads(self.cpu_file.read_text()) if self.cpu_file.exists() else {}
            saved[str(self.step)] = round(self.train_cpu(), 1)
            self.cpu_file.write_text(json.dumps(saved))
    return Timed


def done_steps(out_dir: Path) -> int:
    from guided.training.checkpoints import list_checkpoints

    found = list_checkpoints(out_dir)
    return found[-1][0] if found else 0


def train_all(runs: Path, until: int, log: Path) -> None:
    from guided.training.trainer import train

    for i, (recipe, seed, steps) in enumerate(STAGES[:until]):
        cfg = run_config(recipe, seed, steps, runs)
        if done_steps(Path(cfg.train.out_dir)) >= steps:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] stage {i}: {recipe} seed {seed} to {steps} steps", flush=True)
        if train(timed_trainer(recipe, seed, log), cfg, resume=True).status == "stopped":
            print("stopped (SIGTERM or Ctrl-C): rerun the same command to continue", flush=True)
            return


# -- the report ---------------------------------------------------------------------------------
SHIPPED_RUN = "cond (configs/digits.yaml, lr 1e-3)"  # its rows in docs/digits_training.csv
SHIPPED_S_PER_STEP = 90 * 60 / 12000  # README "Digits models": 90 wall minutes for 12,000 steps, one thread


def curves(log: Path) -> dict:
    """{(recipe, seed): [(step, fid, floor, train CPU s or None)]}: the log's probes (the last of
    repeated steps) and the shipped run as the paper's seed 0 (its CPU time estimated from its wall time)."""
    import csv

    runs: dict = {}
    for row in (json.loads(x) for x in log.read_text().splitlines() if x.strip()) if log.exists() else []:
        runs.setdefault((row["recipe"], row["seed"]), {})[row["step"]] = (row["fid"], row["floor"], row["train_cpu_s"])
    with open(ROOT / "docs" / "digits_training.csv") as f:
        shipped = {int(r["step"]): (float(r["fid"]), float(r["floor"]), None) for r in csv.DictReader(f)
                   if r["run"] == SHIPPED_RUN}
    runs[("paper", 0)] = shipped
    return {k: [(s, *v) for s, v in sorted(d.items())] for k, d in sorted(runs.items())}


def first_reach(points, target: float):
    """(step, CPU s) of the first probe at or under `target`, or None."""
    for step, fid, _, cpu in points:
        if fid <= target:
            return step, cpu
    return None


def table(runs: dict) -> list[str]:
    def cell(hit):
        if hit is None:
            return "not reached"
        step, cpu = hit
        return f"{step:,} ({cpu / 60:.0f} CPU-min)" if cpu is not None else f"{step:,} (~{step * SHIPPED_S_PER_STEP / 60:.0f} min wall)"
    lines = ["| recipe | seed | steps probed | last FID | to 1.2x floor | to 11.7 (shipped) |", "|---|---|---|---|---|---|"]
    for (recipe, seed), pts in runs.items():
        floor = pts[-1][2]
        lines.append(f"| {recipe} | {seed} | {pts[-1][0]:,} | {pts[-1][1]:.1f} (floor {floor:.1f}) | "
                     f"{cell(first_reach(pts, TARGET_FACTOR * floor))} | {cell(first_reach(pts, SHIPPED_FID))} |")
    return lines


def at_steps(runs: dict, steps=(1000, 2000, 3000, 4000, 6000, 8000, 12000)) -> list[str]:
    """Probe FID of every run at the same steps (blank where not probed yet)."""
    lines = ["| recipe | seed | " + " | ".join(f"{s:,}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for (recipe, seed), pts in runs.items():
        fid = {p[0]: p[1] for p in pts}
        lines.append(f"| {recipe} | {seed} | " + " | ".join(f"{fid[s]:.1f}" if s in fid else "" for s in steps) + " |")
    return lines


def report(log: Path, out: Path) -> None:
    """out.png (FID against steps, every run) and out.md (the table)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = curves(log)
    colours = {r: f"C{i}" for i, r in enumerate(RECIPES)}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (recipe, seed), pts in runs.items():
        label = f"{recipe} seed {seed}" + (" (the shipped run)" if (recipe, seed) == ("paper", 0) else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colours[recipe],
                ls="-" if seed == 0 else "--", label=label)
    floor = next(iter(runs.values()))[-1][2]
    ax.axhline(floor, color="k", lw=0.8, ls=":", label=f"real digits (floor {floor:.1f})")
    ax.axhline(TARGET_FACTOR * floor, color="grey", lw=0.8, ls="-.", label=f"1.2x floor ({TARGET_FACTOR * floor:.1f})")
    ax.axhline(SHIPPED_FID, color="r", lw=0.8, ls=":", label=f"shipped cond at 12,000 ({SHIPPED_FID})")
    ax.axvline(4000, color="grey", lw=0.5)
    ax.set(xlabel="training step (batch 64)", ylabel="probe FID (judge space, 300 samples)", yscale="log",
           title="digits: training recipes judged by the probe (EMA 0.999 weights)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    text = "\n".join(at_steps(runs)) + "\n\n" + "\n".join(table(runs)) + "\n"
    title = ("# Recipes study: every run\n\nProbe FID of every recipe and seed at the same steps, and the steps and "
             "CPU time to the targets (generated by `python scripts/training_recipes_study.py --report`; the "
             "recipes and what the numbers mean: [Training recipes](training.md)).\n\n")
    out.with_suffix(".md").write_text(title + text)
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "recipes"))
    p.add_argument("--until", type=int, default=len(STAGES), help="run the first N stages of the plan")
    p.add_argument("--report", action="store_true", help="write the figure and table from the log")
    p.add_argument("--log", default=str(LOG))
    p.add_argument("--pick-ema", metavar="RUN_DIR", help="probe post-hoc EMAs of a run (train.posthoc_ema) "
                   "at --sigma-rels and print the table")
    p.add_argument("--sigma-rels", default="0.01,0.02,0.05,0.10,0.15,0.20")
    args = p.parse_args(argv)
    if args.pick_ema:
        from guided.training.probe import probe_ema_lengths

        print("| sigma_rel | step | probe FID | judge accuracy | sum of coefficients |\n|---|---|---|---|---|")
        for r in probe_ema_lengths(args.pick_ema, [float(x) for x in args.sigma_rels.split(",")]):
            print(f"| {r['sigma_rel']} | {r['step']} | {r['probe_fid']:.1f} | {r['probe_acc']:.1%} | "
                  f"{r['coefficient_sum']:.3f} |", flush=True)
        return 0
    if args.report:
        report(Path(args.log), ROOT / "docs" / "training_recipes_study")
        return 0
    train_all(Path(args.runs), args.until, Path(args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
