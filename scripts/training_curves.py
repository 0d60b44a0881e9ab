"""The digits runs' probe curves: judge-space FID of EMA samples against the held-out digits over steps.

    python scripts/training_curves.py RUN_DIR[=LABEL] ... --out docs/digits_training.png

Reads each run's metrics.jsonl (the trainer's probe_* rows, guided/probe.py), draws FID against
steps with the real-data floor as a dashed line, and writes the numbers beside the figure (.csv),
plus each run's wall time (config.yaml to its newest checkpoint) and steps.
"""
import argparse
import csv
import json
import sys
from pathlib import Path


def curves(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe_fid" in r]
    ckpts = sorted(run.glob("ckpt-*.pt"))
    wall = (ckpts[-1].stat().st_mtime - (run / "config.yaml").stat().st_mtime) if ckpts else float("nan")
    return {"steps": [r["step"] for r in probes], "fid": [r["probe_fid"] for r in probes],
            "fid_null": [r.get("probe_fid_null") for r in probes], "floor": probes[-1]["probe_fid_floor"] if probes else None,
            "last_step": max(r["step"] for r in rows), "wall_min": wall / 60}


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="docs/digits_training.png")
    args = p.parse_args(argv)
    fig, ax = plt.subplots(figsize=(7, 4))
    table = []
    for spec in args.runs:
        path, _, name = spec.partition("=")
        c = curves(Path(path))
        name = name or Path(path).name
        line, = ax.plot(c["steps"], c["fid"], marker="o", label=name)
        if any(v is not None for v in c["fid_null"]):
            ax.plot(c["steps"], c["fid_null"], marker="x", ls=":", color=line.get_color(), label=f"{name}, null class")
        ax.axhline(c["floor"], ls="--", lw=0.8, color=line.get_color())
        table += [{"run": name, "step": s, "fid": f, "fid_null": n, "floor": c["floor"]}
                  for s, f, n in zip(c["steps"], c["fid"], c["fid_null"])]
        print(f"{name}: {c['last_step']} steps, {c['wall_min']:.0f} min; last probe FID {c['fid'][-1]:.1f} "
              f"(floor {c['floor']:.1f} at the same count)")
    ax.set(xlabel="training step", ylabel="judge-space FID to held-out digits", yscale="log",
           title="probe of the EMA weights (dashed: real training digits, same count)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    with open(Path(args.out).with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
