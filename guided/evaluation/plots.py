"""Figures of guidance sweeps, and the data behind them.

`tradeoff` draws the paper's trade-off figures (Dhariwal & Nichol 2021, fig. 5: varying
the classifier scale): precision against recall, and FID against Inception Score, one
curve per sweep folder, each point labelled with its value of the swept parameter and
with error bars of one standard deviation over seeds. A sweep folder is one method of a
guidance study, so many can be overlaid; the figure's numbers go to tradeoff.csv and
tradeoff.json beside the PNG. `plot_sweep` draws one sweep's metrics against the swept
parameter (the sweep's own sweep.png). The command line is guided.cli.plots.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from guided.errors import GuidedError
from guided.evaluation.sweeps import label, load_sweep  # noqa: F401  (label: the figures' names of values)
from guided.generation.writer import write_output

NAMES = {"fid": "FID", "fd_dinov2": "FD-DINOv2", "sfid": "sFID", "inception_score": "Inception Score",
         "precision": "precision", "recall": "recall", "judge_accuracy": "judge accuracy"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:

    write_output(Path(path), lambda f: fig.savefig(f, format="png", dpi=110))
    _pyplot().close(fig)


def _positions(values):
    """x positions of the swept values: the values when numeric, else their order (with tick labels)."""
    if all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values], None
    return list(range(len(values))), [str(v) for v in values]


def plot_sweep(path: Path, results: dict) -> None:
    """Every metric against the swept parameter: the mean over seeds with +-1 std error bars,
    and the minimum over seeds as a cross where there are several."""
    plt = _pyplot()
    param, rows = results["param"], results["summary"]
    metrics = [m for m in NAMES if any(r.get(m, {}).get("mean") is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    x, ticks = _positions([r[param] for r in rows])
    for ax, m in zip(axes[0], metrics):
        mean = [r[m]["mean"] for r in rows]
        std = [r[m]["std"] or 0.0 for r in rows]
        ax.errorbar(x, mean, yerr=std, fmt="o-", capsize=3)
        if any(r[m]["n"] > 1 for r in rows):
            ax.plot(x, [r[m]["min"] for r in rows], "x", color="grey", label="min over seeds")
            ax.legend(fontsize=7)
        if ticks:
            ax.set_xticks(x, ticks)
        ax.set_xlabel(param.replace("_", " "))
        ax.set_title(NAMES[m])
        ax.grid(alpha=0.3)
    seeds = max(r["seeds"] for r in rows)
    fig.suptitle(f"{rows[0]['num_samples']} samples per point, {seeds} seed{'s' * (seeds > 1)}; "
                 f"{results['features']} features", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def tradeoff_rows(sweeps: list[dict], labels: list[str]) -> list[dict]:
    """The figure's numbers: one row per (method, swept value)."""
    rows = []
    for s, name in zip(sweeps, labels):
        for r in s["summary"]:
            row = {"method": name, "folder": s["folder"], "param": s["param"], "value": r[s["param"]],
                   "seeds": r["seeds"], "num_samples": r["num_samples"], "features": s["features"]}
            for m in ("precision", "recall", s["fd_key"], "inception_score"):
                if m in r:
                    row[f"{m}_mean"], row[f"{m}_std"] = r[m]["mean"], r[m]["std"]
            rows.append(row)
    return rows


def check_comparable(sweeps: list[dict], labels: list[str]) -> list[str]:
    """Refuse sweeps measured in different feature spaces; warn about differing counts or references."""
    spaces = {s["features"] for s in sweeps}
    if len(spaces) > 1:
        what = ", ".join(f"{n}: {s['features']}" for s, n in zip(sweeps, labels))
        raise GuidedError(f"the sweeps were measured in different feature spaces ({what}); "
                          f"their numbers do not compare")
    warnings = []
    for key, what in (("num_samples", "sample counts"), ("reference", "reference batches")):
        seen = {str(s["settings"].get(key)) for s in sweeps}
        if len(seen) > 1:
            warnings.append(f"the sweeps differ in {what} ({', '.join(sorted(seen))}): FID and FD depend on them, "
                            f"compare with care")
    return warnings


def tradeoff(folders, out: Path, labels=None) -> list[str]:
    """Write OUT.png (precision-recall and FD-IS trade-offs), OUT.csv and OUT.json; return warnings."""
    out = Path(out)
    if out.suffix != ".png":
        raise GuidedError(f"--out {out}: give a .png file name (the data go beside it as .csv and .json)")
    sweeps = [load_sweep(f) for f in folders]
    labels = labels or [Path(f).resolve().name for f in folders]
    if len(labels) != len(sweeps) or len(set(labels)) != len(labels):
        raise GuidedError(f"{len(sweeps)} sweep folders need as many different labels, got {', '.join(labels)} "
                          f"(--labels)")
    warnings = check_comparable(sweeps, labels)
    rows = tradeoff_rows(sweeps, labels)
    fd = sweeps[0]["fd_key"]
    panels = [("precision", "recall")]
    if all("inception_score_mean" in r and f"{fd}_mean" in r for r in rows):
        panels.append(("inception_score", fd))
    else:
        warnings.append(f"no Inception Score in {sweeps[0]['features']} features: only precision against recall")
    _draw_tradeoff(out, rows, labels, panels, sweeps[0]["features"])
    _write_data(out, rows, warnings)
    return warnings


def _draw_tradeoff(out: Path, rows: list[dict], labels: list[str], panels, features: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (xm, ym) in zip(axes[0], panels):
        for name in labels:
            pts = [r for r in rows if r["method"] == name]
            ax.errorbar([r[f"{xm}_mean"] for r in pts], [r[f"{ym}_mean"] for r in pts],
                        xerr=[r[f"{xm}_std"] or 0.0 for r in pts], yerr=[r[f"{ym}_std"] or 0.0 for r in pts],
                        fmt="o-", capsize=2, label=f"{name} ({pts[0]['param'].replace('_', ' ')})")
            for r in pts:
                ax.annotate(label(r["value"]), (r[f"{xm}_mean"], r[f"{ym}_mean"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xlabel(NAMES[xm])
        ax.set_ylabel(NAMES[ym])
        ax.set_title(f"{NAMES[ym]} against {NAMES[xm]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{features} features; points labelled by the swept value", fontsize=9)
    fig.tight_layout()
    _save(fig, out)


def _write_data(out: Path, rows: list[dict], warnings: list[str]) -> None:

    fields = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    write_output(out.with_suffix(".csv"), lambda f: f.write(text.getvalue().encode()))
    blob = json.dumps({"points": rows, "warnings": warnings}, indent=1) + "\n"
    write_output(out.with_suffix(".json"), lambda f: f.write(blob.encode()))
