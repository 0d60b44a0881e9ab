"""Guidance sweeps in the library: what a sweep is made with, its results book and its loop.

A sweep folder OUT is one experiment (the command line: guided/cli/sweep.py). OUT/settings.json records
what every row was made with; `claim` refuses a folder holding another sweep. Samples go to
OUT/<param>_<value>/seed_<s>/; per-run metrics to OUT/runs.csv, their summary over seeds per value to
OUT/results.csv and OUT/results.json (`save_results`), the one file every reader opens (`load_sweep`:
the trade-off plots, the demo's Sweep tab). `run_sweep` samples and evaluates every (value, seed) not
done yet, so a rerun resumes.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from guided.errors import GuidedError
from guided.evaluation.evaluate import METRICS, evaluate
from guided.evaluation.metrics import summarize
from guided.generation import generate
from guided.generation.resolve import resolve
from guided.generation.writer import write_output

RESULT_FILES = ("settings.json", "results.json", "results.csv", "runs.csv", "sweep.png")


def label(value) -> str:
    """A swept value as it appears in folder names and tables."""
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


# -- what a sweep is made with -------------------------------------------------------------------
def weights_digest(module) -> Optional[str]:
    """sha256 of a network's weights (values in order, so a compiled copy digests the same)."""
    if module is None:
        return None
    h = hashlib.sha256()
    for t in module.state_dict().values():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]


def claim(out: Path, settings: dict, overwrite: bool, write: bool) -> None:
    """Make `out` this sweep's folder: refuse one holding another sweep (or samples), unless
    `overwrite`, which deletes that sweep first. Only the writing process (`write`) changes files."""
    settings = json.loads(json.dumps(settings))  # as it reads back
    f = out / "settings.json"
    old = json.loads(f.read_text()) if f.is_file() else None
    if old is not None and "sweep" not in old:
        raise GuidedError(f"{out} holds samples of sample_guided.py, not a sweep; choose another --out")
    legacy = old is None and (out / "results.json").is_file()
    if (legacy or (old is not None and old != settings)) and not overwrite:
        why = "a sweep from before sweeps recorded their settings" if legacy else \
            "a sweep with other settings (" + "; ".join(differences(old, settings)) + ")"
        raise GuidedError(f"{out} holds {why}; pass --overwrite to delete it and start afresh, or choose another --out")
    if not write:
        return
    if overwrite and (legacy or old is not None):
        param = old["sweep"] if old else "scale"
        for p in [*(out / n for n in RESULT_FILES), *out.glob(f"{param}_*"), *out.glob("reference_digits_*")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if not f.is_file() or overwrite:
        write_output(f, lambda fh: fh.write((json.dumps(settings, indent=1) + "\n").encode()))


def load_runs(out: Path) -> list[dict]:
    f = out / "results.json"
    return json.loads(f.read_text())["runs"] if f.is_file() else []


def summarize_runs(runs: list[dict], param: str) -> list[dict]:
    """Per value: how many seeds, and mean / std / min / max of every metric over them."""
    values = list(dict.fromkeys(r[param] for r in runs))
    if all(isinstance(v, (int, float)) for v in values):
        values.sort()
    rows = []
    for v in values:
        mine = [r for r in runs if r[param] == v]
        row = {param: v, "seeds": len(mine), "num_samples": mine[0]["num_samples"]}
        row.update({m: summarize([r.get(m) for r in mine]) for m in METRICS if any(m in r for r in mine)})
        rows.append(row)
    return rows


def flat_rows(results: dict) -> list[dict]:
    """The summary as flat rows (results.csv): mean, std, min and max of every metric per value."""
    param = results["param"]
    return [{param: r[param], "seeds": r["seeds"], "num_samples": r["num_samples"],
             **{f"{m}_{s}": r[m][s] for m in METRICS if m in r for s in ("mean", "std", "min", "max")}}
            for r in results["summary"]]


def save_results(out: Path, settings: dict, runs: list[dict], extractor) -> dict:
    """results.json, results.csv and runs.csv of the runs so far."""
    param = settings["sweep"]
    results = {"param": param, "features": extractor.name, "fd_key": extractor.fd_key, "settings": settings,
               "summary": summarize_runs(runs, param), "runs": runs}
    write_output(out / "results.json", lambda f: f.write((json.dumps(results, indent=1) + "\n").encode()))
    _write_csv(out / "results.csv", flat_rows(results))
    _write_csv(out / "runs.csv", runs)
    return results


def _write_csv(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows(rows)
    write_output(path, lambda f: f.write(text.getvalue().encode()))


def format_table(results: dict) -> str:
    """The summary as text: mean +- std (min) of every metric per value, with the counts."""
    param, rows = results["param"], results["summary"]
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    cell = lambda s: "-" if s["mean"] is None else (  # noqa: E731
        f"{s['mean']:.4g}" + (f" +- {s['std']:.2g} (min {s['min']:.4g})" if s["std"] is not None else ""))
    table = [[param, "seeds", "samples", *metrics]]
    table += [[label(r[param]), str(r["seeds"]), str(r["num_samples"]), *(cell(r[m]) if m in r else "-" for m in metrics)]
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def load_sweep(folder) -> dict:
    """results.json of a sweep folder, with its folder: the one reader of a sweep's results."""
    f = Path(folder) / "results.json"
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise GuidedError(f"{folder} holds no results.json: not a finished sweep of python -m guided.cli.sweep") from None
    except (OSError, ValueError) as e:
        raise GuidedError(f"cannot read {f}: {e}") from None
    if not isinstance(data, dict) or "summary" not in data or not data["summary"]:
        raise GuidedError(f"{f} is not the results of python -m guided.cli.sweep (rerun the sweep to update it)")
    return dict(data, folder=str(folder))


@dataclasses.dataclass
class SweepPlan:
    """One sweep: the swept option `param`, its values, how a value sets the request (`vary`), and the
    sampling that every point shares."""
    param: str
    values: list
    vary: Callable  # vary(request SampleOptions, value) -> SampleOptions
    request: object  # guided.generation.SampleOptions as asked (resolved per point)
    classes: list
    num_samples: int
    batch_size: int
    seeds: list
    class_sampling: str = "balanced"
    record: Optional[dict] = None  # what each point's settings.json also says


def run_point(pipeline, plan: SweepPlan, value, seed, point: Path, device, rank, world, barrier) -> Path:
    """One point's samples (kept when a point of this sweep drew them before an interruption)."""
    npz, record = point / "samples.npz", point / "settings.json"
    opts = resolve(pipeline, plan.vary(plan.request, value))
    if npz.exists() and record.exists():  # sampled before an interruption: it must be this point's
        expected = {"seed": seed, "num_samples": plan.num_samples, "options": dataclasses.asdict(opts)}
        found = json.loads(record.read_text())
        if any(found.get(k) != json.loads(json.dumps(v)) for k, v in expected.items()):
            raise GuidedError(f"{npz} was drawn with other settings than this sweep's; delete {point} "
                              f"or use --overwrite")
        return npz
    # without settings.json the assembly was cut short: its batches are still in parts/ and are reused
    generate(pipeline, point, classes=plan.classes, num_samples=plan.num_samples, batch_size=plan.batch_size,
             seed=seed, opts=opts, device=device, rank=rank, world_size=world, barrier=barrier,
             class_sampling=plan.class_sampling, settings=dict(plan.record or {}, sweep=str(point.parent.parent)),
             overwrite=npz.exists())
    return npz


def run_sweep(pipeline, plan: SweepPlan, out: Path, settings: dict, extractor, reference, *, device="cpu",
              rank: int = 0, world: int = 1, barrier=None, plot: Optional[Callable] = None) -> dict:
    """Sample and evaluate every (value, seed) of `plan` that OUT's results do not hold yet; write the book
    after each (and `plot(out, results)`); the results ({} on ranks other than 0)."""
    param = plan.param
    runs = load_runs(out)
    done = {(json.dumps(r[param]), r["seed"]) for r in runs}
    todo = [(v, s) for v in plan.values for s in plan.seeds if (json.dumps(v), s) not in done]
    warned = set()
    for value, seed in todo:
        point = out / f"{param}_{label(value)}" / f"seed_{seed}"
        npz = run_point(pipeline, plan, value, seed, point, device, rank, world, barrier)
        if rank != 0:
            continue
        m = evaluate(npz, reference, extractor, batch_size=64, device=device)
        runs.append({param: value, "seed": seed, **{k: m[k] for k in (*METRICS, "num_samples", "num_reference",
                                                                      "num_labelled") if k in m}})
        results = save_results(out, settings, runs, extractor)
        if plot is not None:
            plot(out, results)
        print(f"{param}={label(value)} seed={seed}: " + " ".join(
            f"{k}={m[k]:.4g}" for k in METRICS if k in m) + f" ({m['num_samples']} samples)")
        for w in m["warnings"]:
            if w not in warned:
                print(f"warning: {w}", file=sys.stderr)
                warned.add(w)
    if rank != 0:
        return {}
    if not runs:
        raise GuidedError(f"{out}: nothing to evaluate")
    if not todo:
        print(f"{out} is complete: {len(plan.values)} values x {len(plan.seeds)} seeds already evaluated; nothing to do")
    return json.loads((out / "results.json").read_text())
