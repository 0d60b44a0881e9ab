"""The table and Pareto plot of scripts/fewstep_study.py's rows (docs/fewstep_study.jsonl)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

PILOT_SEED = 100000


def sampler_label(row: dict) -> str:
    """The sampler's name with its settings (--sampler-arg), e.g. 'dpm++2m-sde threshold=static'."""
    def value(v):
        return ",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else v
    return " ".join([row["sampler"], *(f"{k}={value(v)}" for k, v in sorted(row.get("extra", {}).items()))])


def confirmed(rows: list[dict]) -> dict:
    """(method, sampler label, steps, scale) -> its rows on the confirming seeds."""
    out = defaultdict(list)
    for r in rows:
        if r["seed"] != PILOT_SEED:
            out[(r["method"], sampler_label(r), r["steps"], r["scale"])].append(r)
    return out


def summary(group: list[dict]) -> dict:
    fd = np.array([r["fd"] for r in group])
    wall = [r["wall_s"] / r["num_samples"] for r in group if "wall_s" in r]
    cpu = [r["cpu_s"] / r["num_samples"] for r in group if "cpu_s" in r]
    return {"fd": fd.mean(), "fd_sd": fd.std(ddof=1) if len(fd) > 1 else float("nan"), "seeds": len(fd),
            "samples": sum(r["num_samples"] for r in group), "acc": np.mean([r["judge_accuracy"] for r in group]),
            "score": group[0]["score_evals"], "classifier": group[0]["classifier_evals"],
            "wall": np.median(wall) if wall else float("nan"), "cpu": np.median(cpu) if cpu else float("nan")}


def table(rows: list[dict]) -> str:
    groups = {k: summary(v) for k, v in confirmed(rows).items()}
    refs = {k[0]: g for k, g in groups.items() if k[1] == "ddpm" and k[2] == "250"}
    lines = ["| method | sampler | steps | scale | score-model evals | classifier evals | FD (mean ± sd) | "
             "FD / DDPM 250 | judge accuracy | seeds x samples | ms per sample (wall / CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (method, sampler, steps, scale), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1]["score"], kv[1]["fd"])):
        ref = refs.get(method)
        ratio = f"{g['fd'] / ref['fd']:.2f}" if ref else "no reference yet"
        lines.append(f"| {method} | {sampler} | {steps} | {scale:g} | {g['score']:g} | {g['classifier']:g} | "
                     f"{g['fd']:.1f} ± {g['fd_sd']:.1f} | {ratio} | {g['acc']:.1%} | {g['seeds']} x "
                     f"{g['samples'] // g['seeds']} | {1000 * g['wall']:.0f} / {1000 * g['cpu']:.0f} |")
    return "\n".join(lines)


def targets(rows: list[dict]) -> str:
    """Per guidance method, the issue's two targets against DDPM 250: the lowest mean FD at <= 20 and at
    <= 10 score-model evaluations among configurations of at least 3 seeds whose mean judge accuracy is
    at least the reference's (FD within 1.15x and 1.5x of the reference's wanted)."""
    groups = {k: summary(v) for k, v in confirmed(rows).items()}
    lines = ["| method | evaluations | target | best configuration | FD / DDPM 250 | judge accuracy (reference) | met |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (method, sampler, steps, scale), ref in groups.items():
        if sampler != "ddpm" or steps != "250":
            continue
        for nfe, bound in ((20, 1.15), (10, 1.5)):
            ok = [(k, g) for k, g in groups.items() if k[0] == method and k[1:3] != ("ddpm", "250")
                  and g["score"] <= nfe and g["seeds"] >= 3 and g["acc"] >= ref["acc"] - 1e-9]
            if not ok:
                lines.append(f"| {method} | <= {nfe} | {bound}x | none of 3 seeds at the reference's accuracy | | "
                             f"({ref['acc']:.1%}) | no |")
                continue
            (_, name, st, sc), g = min(ok, key=lambda kg: kg[1]["fd"])
            ratio = g["fd"] / ref["fd"]
            lines.append(f"| {method} | <= {nfe} | {bound}x | {name} {st}, scale {sc:g} ({g['seeds']} seeds) | "
                         f"{g['fd']:.2f} / {ref['fd']:.2f} = {ratio:.2f}x | {g['acc']:.2%} ({ref['acc']:.2%}) | "
                         f"{'yes' if ratio <= bound else 'no'} |")
    return "\n".join(lines)


def grid(rows: list[dict], configs: list[tuple]) -> str:
    """The wide grid at a glance: per sampler (with its settings) and schedule, at each evaluation count,
    the confirmed configuration's mean FD, its accuracy and scale; configs are (sampler label, schedule,
    evaluation count, steps). A cell is `-` until 3 seeds are drawn; * marks accuracy below the reference's."""
    groups = {k: summary(v) for k, v in confirmed(rows).items() if k[0] == "classifier"}
    ref = next((g for k, g in groups.items() if k[1:3] == ("ddpm", "250")), None)
    counts = sorted({c[2] for c in configs})
    cells = defaultdict(dict)
    for name, schedule, nfe, steps in configs:
        ok = [(k[3], g) for k, g in groups.items() if k[1:3] == (name, steps) and g["seeds"] >= 3]
        if not ok:
            cells[(name, schedule)][nfe] = "-"
            continue
        at_ref = [kg for kg in ok if ref is None or kg[1]["acc"] >= ref["acc"] - 1e-9]
        scale, g = min(at_ref, key=lambda kg: kg[1]["fd"]) if at_ref else max(ok, key=lambda kg: kg[1]["acc"])
        mark = "" if at_ref else "*"
        evals = "" if g["score"] == nfe else f" ({g['score']:g})"
        cells[(name, schedule)][nfe] = f"{g['fd']:.1f}{evals} · {g['acc']:.1%}{mark} · s{scale:g}"
    lines = ["| sampler | schedule | " + " | ".join(f"{n}" for n in counts) + " |",
             "| --- | --- | " + " | ".join("---" for _ in counts) + " |"]
    for (name, schedule), row in cells.items():
        lines.append(f"| {name} | {schedule} | " + " | ".join(row.get(n, "") for n in counts) + " |")
    return "\n".join(lines)


def pareto(rows: list[dict], path) -> None:
    """FD against score-model evaluations of classifier guidance, one line per sampler: at each count its
    configuration (schedule, scale, settings) of lowest mean FD among those of 3+ seeds at or above the
    reference's judge accuracy; DDPM 250 as a line with the 1.15x band of the 20-evaluation target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {k: (summary(v), v[0]["sampler"]) for k, v in confirmed(rows).items() if k[0] == "classifier"}
    ref = next((g for (m, name, steps, _), (g, _) in groups.items() if name == "ddpm" and steps == "250"), None)
    best = defaultdict(dict)
    for (_, name, steps, scale), (g, family) in groups.items():
        if family == "ddpm" or g["seeds"] < 3 or (ref is not None and g["acc"] < ref["acc"] - 1e-9):
            continue
        cur = best[family].get(g["score"])
        if cur is None or g["fd"] < cur["fd"]:
            best[family][g["score"]] = g
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for sampler, points in sorted(best.items()):
        xs = sorted(points)
        ax.errorbar(xs, [points[x]["fd"] for x in xs], yerr=[np.nan_to_num(points[x]["fd_sd"]) for x in xs],
                    marker="o", capsize=3, label=sampler)
    if ref is not None:
        ax.axhline(ref["fd"], color="k", lw=1, label=f"DDPM 250 ({ref['acc']:.1%} accuracy)")
        ax.axhspan(ref["fd"], 1.15 * ref["fd"], color="k", alpha=0.08, label="within 1.15x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = []
    for x in sorted({x for points in best.values() for x in points}, reverse=True):  # no overlapping labels
        if not ticks or x < 0.9 * ticks[-1]:
            ticks.append(x)
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_yticks([2, 3, 5, 10, 20, 50], ["2", "3", "5", "10", "20", "50"])
    ax.set_xlabel("score-model evaluations per sample")
    ax.set_ylabel("FD (digits judge features)")
    ax.set_title("Classifier-guided digits at >= DDPM 250's accuracy", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(rows: list[dict], png, configs: list[tuple], md) -> None:
    """Print the targets and the wide grid; write them with the full table to md and the plot to png."""
    parts = [targets(rows), grid(rows, configs), table(rows)]
    print(parts[0] + "\n\n" + parts[1])
    md.write_text("# The few-step study's tables\n\n"
                  "Written by `OMP_NUM_THREADS=1 python scripts/fewstep_study.py --report` from docs/fewstep_study.jsonl "
                  "(README, \"Guided sampling in few steps\").\n\n"
                  "## The issue's targets\n\n" + parts[0] + "\n\n"
                  "## The wide grid\n\nClassifier guidance (uncond + classifier). Each cell: mean FD over 3+ seeds "
                  "(the evaluations in brackets where they differ from the column's), judge accuracy (* below the "
                  "reference's), scale; `-` not drawn yet.\n\n" + parts[1] + "\n\n"
                  "## Every configuration drawn\n\nEach confirmed scale of each configuration, sorted by method, "
                  "evaluations and FD.\n\n" + parts[2] + "\n")
    pareto(rows, png)
    print(f"wrote {md} and {png}")
