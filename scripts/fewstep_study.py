"""The few-step study of README "Guided sampling in few steps": sampler x schedule x steps against DDPM 250.

    OMP_NUM_THREADS=1 python scripts/fewstep_study.py [--pilot-samples 100] [--samples 500] [--budget-min 600]
    OMP_NUM_THREADS=1 python scripts/fewstep_study.py --report      # docs/fewstep_study.md and docs/fewstep_pareto.png
    OMP_NUM_THREADS=1 python scripts/fewstep_study.py --shard 1/2   # a second process on the other half of the plan

Each configuration (model, guidance method, sampler, respacing) is first drawn on one pilot seed
(100000 + i, disjoint from the rest) at every scale of its grid; the scale of lowest judge-space FD
among those at or above the reference's judge accuracy is then confirmed on seeds 0, 500 and 1000
(500 samples each: disjoint). Points run in a fixed order of priority (the 20- and 10-evaluation
points first, the reference's other seeds, then the wide grid: every few-step sampler with the shipped
models' static clip, and the older DPM-Solver++(2M), on karras, logsnr and quad spacings at 8-50
evaluations, piloted at scales 1.5, 2.25, 3 and 4), each appended to
docs/fewstep_study.jsonl as it finishes, so a rerun resumes and a stopped run keeps every point.
Per point: FD in the digits judge's features against 1,000 class-balanced training digits (as
`guided.cli.sweep --features digits`), judge accuracy, score-model and classifier evaluations per
sample (counted by forward hooks on a 2-sample probe of the same configuration; a classifier-free
pass counts twice, autoguidance's weak model counts as a score model), wall and CPU seconds of the
drawing on this machine. Samples go to sweeps/fewstep/ (not committed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guided.evaluation.evaluate import evaluate  # noqa: E402
from guided.evaluation.features import get_extractor  # noqa: E402
from guided.evaluation.reference_batch import build_reference, write_reference  # noqa: E402
from guided.generation import SampleOptions, generate, load_pipeline, sample_batch  # noqa: E402
from guided.generation.options import BY_TERM  # noqa: E402
from guided.samplers.fewstep import settings as fewstep_settings  # noqa: E402
from guided.samplers.registry import SAMPLERS  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from fewstep_report import report, sampler_label  # noqa: E402

RESULTS = ROOT / "docs" / "fewstep_study.jsonl"
OUT = ROOT / "sweeps" / "fewstep"
PILOT_SEED, SEEDS = 100000, (0, 500, 1000)
CLS = (1.0, 2.0, 4.0)
METHOD = {  # method -> (model, the SampleOptions field of its scale, default grid)
    "classifier": ("uncond", "scale", CLS),
    "cfg": ("cond", "cfg_scale", (1.0, 1.5, 2.0)),
    "autoguide": ("cond", "autoguide_scale", (1.5, 2.0, 3.0)),
}
REFERENCE = {"classifier": 2.0, "cfg": 1.0, "autoguide": 2.0}  # DDPM 250's scale (README guidance study's best)


def steps_for(sampler: str, schedule: str, nfe: int) -> str:
    """The respacing whose network evaluations are about nfe: Heun (edm) evaluates 2N - 1 times."""
    n = (nfe + 1) // 2 if sampler == "edm" else nfe
    return f"{schedule}{n}" if schedule else str(n)


WIDE_GRID = (1.5, 2.25, 3.0, 4.0)  # the wide grid's pilot scales (the static clip moves the best up from 2)
WIDE_COUNTS = (20, 10, 8, 12, 16, 25, 50)  # evaluation counts of the wide grid, in the order they run
STATIC = {"threshold": "static"}  # the shipped models' clip for the few-step samplers (dpm++ always clips)


def plan() -> list[tuple]:
    """(priority class, method, sampler, steps, sampler settings) configurations in the order they run."""
    out = []
    for nfe in (20, 10):
        for sampler in ("dpm++3m", "dpm++2m-sde", "edm"):
            out.append(("core", "classifier", sampler, steps_for(sampler, "karras", nfe), {}))
    out.append(("ref", "classifier", "ddpm", "250", {}))
    for method in ("cfg", "autoguide"):
        out += [("ref", method, "ddpm", "250", {}), ("core", method, "dpm++3m", "karras20", {}),
                ("core", method, "dpm++3m", "karras10", {})]
    for nfe in WIDE_COUNTS:
        for sampler in ("dpm++2m-sde", "edm", "dpm++3m", "dpm++"):
            for schedule in ("karras", "logsnr", "quad"):
                extra = {} if sampler == "dpm++" else STATIC
                out.append(("wide", "classifier", sampler, steps_for(sampler, schedule, nfe), extra))
    seen, ordered = set(), []
    for c in out:
        key = (*c[1:4], tuple(sorted(c[4].items())))
        if key not in seen:
            seen.add(key)
            ordered.append(c)
    return ordered


def wide_configs() -> list[tuple]:
    """The plan's wide grid as (sampler label, schedule, evaluation count, steps), for the report."""
    out = []
    for kind, _, sampler, steps, extra in plan():
        if kind == "wide":
            schedule = steps.rstrip("0123456789")
            nfe = next(n for n in WIDE_COUNTS if steps_for(sampler, schedule, n) == steps)
            out.append((sampler_label({"sampler": sampler, "extra": extra}), schedule, nfe, steps))
    return out


def load_rows() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []


def append_row(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def options(method: str, sampler: str, steps: str, scale: float, extra: dict | None = None) -> SampleOptions:
    """The options of one point; extra's "interval" (lo, hi) is the method's guidance interval, the rest
    are sampler settings (--sampler-arg)."""
    extra = dict(extra or {})
    method_ = BY_TERM[method]
    fields = {method_.scale: scale}
    if "interval" in extra:
        fields[method_.interval] = tuple(extra.pop("interval"))
    return SampleOptions(sampler=sampler, steps=steps, clip_guided=SAMPLERS[sampler].clips(), extra=extra, **fields)


def count_evaluations(p, opts: SampleOptions) -> tuple[float, float]:
    """(score-model, classifier) network evaluations per sample, counted on a 2-sample probe."""
    rows = {"score": 0, "classifier": 0}
    hooks = []
    for net, kind in ((p.model, "score"), (p.weak_model, "score"), (p.classifier, "classifier")):
        if net is not None:
            hooks.append(net.register_forward_hook(lambda m, i, o, k=kind: rows.__setitem__(k, rows[k] + len(i[0]))))
    try:
        sample_batch(p, [3, 7], [0, 1], opts)
    finally:
        for h in hooks:
            h.remove()
    return rows["score"] / 2, rows["classifier"] / 2


class Study:
    def __init__(self, args):
        self.args, self.pipelines, self.counts = args, {}, {}
        self.rows = load_rows()
        self.extractor = get_extractor("digits", 16)
        self.reference = OUT / "reference_digits_16px_3ch.npz"
        if not self.reference.exists():
            OUT.mkdir(parents=True, exist_ok=True)
            images, labels = build_reference("digits", 16, 1000, channels=3, seed=0, progress=False)
            write_reference(self.reference, images, labels)

    def pipeline(self, model: str):
        if model not in self.pipelines:
            self.pipelines[model] = load_pipeline(model, guides=("autoguide",) if model == "cond" else ())
        return self.pipelines[model]

    def done(self, key: dict) -> bool:
        key = {"extra": {}, **key}
        return any(all(r.get(k, {} if k == "extra" else None) == v for k, v in key.items()) for r in self.rows)

    def run_point(self, method, sampler, steps, scale, seed, n, extra=None) -> dict:
        extra = dict(extra or {})
        key = dict(method=method, sampler=sampler, steps=steps, scale=scale, seed=seed, num_samples=n)
        key.update({"extra": extra} if extra else {})
        model = METHOD[method][0]
        p, opts = self.pipeline(model), options(method, sampler, steps, scale, extra)
        name = sampler_label({"sampler": sampler, "extra": extra})
        folder = OUT / model / method / f"{name.replace(' ', '_')}_{steps}" / f"scale_{scale:g}" / f"seed_{seed}"
        cfg = (method, name, steps, scale)
        if cfg not in self.counts:
            self.counts[cfg] = count_evaluations(p, opts)
        timing = {}
        if not (folder / "samples.npz").exists():
            wall, cpu = time.perf_counter(), time.process_time()
            generate(p, folder, classes=list(range(10)), num_samples=n, batch_size=100, seed=seed, opts=opts,
                     settings={"model": model, "study": "fewstep"}, grid=0)
            timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        elif (folder / "time.json").exists():  # drawn by the command line under /usr/bin/time
            timing = json.loads((folder / "time.json").read_text())
        m = evaluate(folder / "samples.npz", self.reference, self.extractor, batch_size=100, progress=False)
        score, classifier = self.counts[cfg]
        row = {**key, "model": model, "fd": m["fid"], "judge_accuracy": m["judge_accuracy"], "score_evals": score,
               "classifier_evals": classifier, **timing}
        append_row(row)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def reference_accuracy(self, method: str) -> float:
        acc = [r["judge_accuracy"] for r in self.rows if r["method"] == method and r["sampler"] == "ddpm"
               and r["steps"] == "250"]
        return float(np.mean(acc)) if acc else 0.95

    def best_scale(self, method, sampler, steps, extra=None) -> float:
        """The pilot scale of lowest FD at >= the reference's accuracy (else the most accurate one)."""
        pilot = [r for r in self.rows if (r["method"], r["sampler"], r["steps"]) == (method, sampler, steps)
                 and r["seed"] == PILOT_SEED and r.get("extra", {}) == (extra or {})]
        ok = [r for r in pilot if r["judge_accuracy"] >= self.reference_accuracy(method) - 1e-9]
        pick = min(ok, key=lambda r: r["fd"]) if ok else max(pilot, key=lambda r: r["judge_accuracy"])
        return pick["scale"]


def tasks(study: Study):
    """Points in order of priority: each configuration's pilot, then its first confirming seed; the
    other confirming seeds after every core configuration has one. --shard i/n takes every n-th
    configuration from the i-th, so n processes share the plan."""
    a = study.args
    index, count = (int(v) for v in a.shard.split("/"))
    configs = [c for i, c in enumerate(plan()) if i % count == index]
    for stage in ("core", "seeds", "wide"):
        for kind, method, sampler, steps, extra in configs:
            if (kind == "wide") != (stage == "wide"):
                continue
            ref = kind == "ref"
            grid = (REFERENCE[method],) if ref else WIDE_GRID if kind == "wide" else METHOD[method][2]
            if stage != "seeds" and not ref:
                for scale in grid:
                    yield (method, sampler, steps, scale, PILOT_SEED, a.pilot_samples, extra)
            seeds = SEEDS[1:] if stage == "seeds" else SEEDS[:1]
            if stage == "wide":
                seeds = SEEDS
            for seed in seeds:
                scale = REFERENCE[method] if ref else None
                yield (method, sampler, steps, scale, seed, a.samples, extra)


def run(args) -> None:
    study = Study(args)
    deadline = time.time() + 60 * args.budget_min
    for method, sampler, steps, scale, seed, n, extra in tasks(study):
        if time.time() > deadline:
            print("budget spent; rerun to continue", flush=True)
            return
        scale = study.best_scale(method, sampler, steps, extra) if scale is None else scale
        key = dict(method=method, sampler=sampler, steps=steps, scale=scale, seed=seed, num_samples=n, extra=extra)
        if not study.done(key):
            study.run_point(method, sampler, steps, scale, seed, n, extra)


def run_points(args) -> None:
    """--point: one configuration on the given seeds, skipping those already in the results."""
    method, sampler, steps, scale = args.point
    extra = fewstep_settings(dict(kv.split("=", 1) for kv in args.sampler_arg))
    if args.interval:
        extra["interval"] = list(args.interval)
    study = Study(args)
    if scale == "best":  # the plan's rule: the method's grid on the pilot seed, then the best scale confirmed
        for s in args.grid or METHOD[method][2]:
            if not study.done(dict(method=method, sampler=sampler, steps=steps, scale=s, seed=PILOT_SEED,
                                   num_samples=args.pilot_samples, extra=extra)):
                study.run_point(method, sampler, steps, s, PILOT_SEED, args.pilot_samples, extra)
        scale = study.best_scale(method, sampler, steps, extra)
    for seed in args.seeds:
        n = args.pilot_samples if seed == PILOT_SEED else args.samples
        key = dict(method=method, sampler=sampler, steps=steps, scale=float(scale), seed=seed, num_samples=n)
        if not study.done({**key, "extra": extra}):
            study.run_point(method, sampler, steps, float(scale), seed, n, extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=500, help="samples per confirming seed")
    p.add_argument("--pilot-samples", type=int, default=100, help="samples per pilot point (scale choice)")
    p.add_argument("--budget-min", type=float, default=600.0, help="start no point after this many minutes")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run every N-th configuration of the plan from the I-th (N processes share it)")
    p.add_argument("--report", action="store_true", help="print the table and draw the plot of the rows so far")
    p.add_argument("--point", nargs=4, metavar=("METHOD", "SAMPLER", "STEPS", "SCALE"),
                   help="draw this one configuration (beside the plan) on --seeds; SCALE 'best' picks it on the pilot seed")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="the seeds of --point")
    p.add_argument("--grid", type=float, nargs="+", help="the pilot scales of --point ... best (default: the method's)")
    p.add_argument("--sampler-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler setting of --point (as sample_guided.py's), repeatable")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="--point's guidance acts only for sigma in [LO, HI] (the method's interval)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.report:
        report(load_rows(), ROOT / "docs" / "fewstep_pareto.png", wide_configs(), ROOT / "docs" / "fewstep_study.md")
        return 0
    if args.point:
        run_points(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
