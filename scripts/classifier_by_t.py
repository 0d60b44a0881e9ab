"""How accurate is a noise-aware classifier, at which t: held-out top-1 and ECE per band of timesteps.

    python scripts/classifier_by_t.py [--classifier classifier] [--bands 20] [--draws 4] [--out docs/classifier_by_t]

Scores the held-out digits (the split no shipped network was trained on) at `draws` timesteps drawn in
each of `bands` equal bands of t, noised as the classifier's training objective noises them, and writes
OUT.png (top-1 and ECE against t, the trainers' figure: guided.training.progress.plot_bands) and OUT.csv.
ECE is computed on the raw logits and on the logits divided by the shipped calibration's temperature.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def by_band(name: str, bands: int, draws: int, seed: int = 0) -> list[dict]:
    from guided.data import build_dataset
    from guided.diffusion.objectives import objective_from_config
    from guided.generation.loading import shipped_path
    from guided.guidance.calibration import expected_calibration_error
    from guided.networks.checkpoints import load_trained

    net, cfg, _ = load_trained(shipped_path(name))
    objective = objective_from_config(cfg)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.update(split="heldout", random_flip=False, random_crop=False)
    val = build_dataset(data)
    x0 = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    T, gen, rows = objective.num_levels, torch.Generator().manual_seed(seed), []
    bands = min(bands, T)  # a short ladder has fewer levels than bands
    calib = getattr(net, "calibration", None)
    for b in range(bands):
        lo, hi = (b * T + bands - 1) // bands, ((b + 1) * T + bands - 1) // bands
        logits, labels, ts = [], [], []
        for _ in range(draws):
            t = torch.randint(lo, hi, (len(y),), generator=gen)
            x = objective.noise(x0, t, torch.randn(x0.shape, generator=gen))
            logits.append(net(x, objective.network_t(t)).float())
            labels.append(y)
            ts.append(objective.network_t(t).double())
        z, lab, tt = torch.cat(logits), torch.cat(labels), torch.cat(ts)
        scaled = z / calib.temperature_at(tt)[:, None] if calib is not None else z
        rows.append(dict(t_from=lo, t_to=hi - 1, n=len(lab), top1=float((z.argmax(-1) == lab).float().mean()),
                         ece=expected_calibration_error(z, lab), ece_calibrated=expected_calibration_error(scaled, lab)))
    return rows


def main(argv=None) -> int:
    from guided.training.progress import Progress, plot_bands

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classifier", default="classifier", help="a shipped name or a weights file")
    p.add_argument("--bands", type=int, default=20)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "docs" / "classifier_by_t"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = by_band(args.classifier, args.bands, args.draws)
    out = Path(args.out)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    progress = Progress()
    progress.steps, progress.acc, progress.ece = ["final"], [[r["top1"] for r in rows]], [[r["ece"] for r in rows]]
    edges = [r["t_from"] for r in rows] + [rows[-1]["t_to"] + 1]
    plot_bands(progress, edges, out.with_suffix(".png"), title=f"shipped {args.classifier}: held-out top-1")
    print("| t | top-1 | ECE | ECE, calibrated |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['t_from']}-{r['t_to']} | {r['top1']:.1%} | {r['ece']:.3f} | {r['ece_calibrated']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
