"""Regenerate the digits figures and tables of docs/ (README: "Digits results").

    python scripts/digits_figures.py scales     # judge accuracy vs classifier scale, docs/digits_scales.png
    python scripts/digits_figures.py samplers   # every sampler at its defaults (+ langevin on ncsn.pt)
    python scripts/digits_figures.py sdedit     # SDEdit realism / faithfulness vs t0, docs/sdedit.png
    python scripts/digits_figures.py sweep      # python -m guided.cli.sweep on both models, docs/sweep_{uncond,cond}.png
    python scripts/digits_figures.py fewstep    # ddpm 250 vs ddim / dpm++ at 50, 25, 10 steps
    python scripts/digits_figures.py clip       # --clip-guided against the paper's arithmetic, per sampler

Each subcommand runs the documented `sample_guided.py` commands (printed as it goes;
an output folder that already holds samples.npz is reused), then scores the samples
with the independent judge (guided.evaluation.judge, not the guidance classifier) and prints a
Markdown table. Outputs go to sweeps/figures/ (not committed); pictures to docs/.
Set OMP_NUM_THREADS=1 on a small shared CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "sweeps" / "figures"
DOCS = ROOT / "docs"
TIMES = OUT / "wall_times.json"


def sh(cmd: str, out: Path | None = None) -> None:
    """Run one CLI command from the repo root unless `out`/samples.npz is already there."""
    if out is not None and (out / "samples.npz").exists():
        return
    print("$", cmd, flush=True)
    t = time.time()
    subprocess.run(shlex.split(cmd), cwd=ROOT, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    times[cmd] = round(time.time() - t, 1)
    TIMES.parent.mkdir(parents=True, exist_ok=True)
    TIMES.write_text(json.dumps(times, indent=1))


def load(path: Path):
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


def judge_stats(images, labels):
    """(accuracy for the asked class, mean confidence in the asked class, share recognised with p > 0.9)."""
    import torch
    from guided.evaluation.judge import load_judge

    j = load_judge(images.shape[1])
    p = torch.softmax(j.logits(images), 1).numpy()
    acc = float(np.mean(p.argmax(1) == labels)) if labels is not None and labels.min() >= 0 else float("nan")
    conf = float(np.mean(p[np.arange(len(p)), labels])) if labels is not None and labels.min() >= 0 else float("nan")
    return acc, conf, float(np.mean(p.max(1) > 0.9)), p


def grid(images, labels, columns=8, zoom=4, pad=1):
    """One row per class, `columns` samples each, as a uint8 HWC array (white padding)."""
    classes = np.unique(labels)
    h, w, c = images.shape[1:]
    g = np.full((len(classes) * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for r, k in enumerate(classes):
        for i, img in enumerate(images[labels == k][:columns]):
            g[pad + r * (h + pad): pad + r * (h + pad) + h, pad + i * (w + pad): pad + i * (w + pad) + w] = \
                img if c == 3 else np.repeat(img, 3, -1)
    return g.repeat(zoom, 0).repeat(zoom, 1)


def save_panels(path: Path, panels, titles, suptitle=None, figsize=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (3.6 * len(panels), 4.3))
    for ax, p, t in zip(np.atleast_1d(axes), panels, titles):
        ax.imshow(p, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


# -- 1. judge accuracy vs classifier-guidance scale -------------------------------------------
SCALES = "0,1,2,4,10"


def scales(args):
    for m in ("uncond", "cond"):
        n = args.num_samples or {"uncond": 200, "cond": 100}[m]
        done = all((OUT / f"scales_{m}" / f"scale_{s}" / "samples.npz").exists() for s in SCALES.split(","))
        if not done:
            sh(f"python sample_guided.py --model {m} --sampler ddpm --scales {SCALES} --num-samples {n} --device cpu "
               f"--out sweeps/figures/scales_{m}")
    rows = {}
    for m in ("uncond", "cond"):
        for s in SCALES.split(","):
            x, y = load(OUT / f"scales_{m}" / f"scale_{s}" / "samples.npz")
            rows[m, s] = judge_stats(x, y)[:2] + (len(y),)
    print(f"\n| model | {' | '.join('scale ' + s for s in SCALES.split(','))} |")
    print("| --- |" + " --- |" * len(SCALES.split(",")))
    for m in ("uncond", "cond"):
        print(f"| {m} + classifier | " + " | ".join(f"{100 * rows[m, s][0]:.1f}%" for s in SCALES.split(",")) + " |")
    print(f"\n(judge accuracy for the asked digit; {rows['uncond', '0'][2]} (uncond) / {rows['cond', '0'][2]} (cond) "
          "samples per cell; mean judge "
          "confidence in the asked digit:)")
    for m in ("uncond", "cond"):
        print(f"| {m} | " + " | ".join(f"{rows[m, s][1]:.2f}" for s in SCALES.split(",")) + " |")
    panels, titles = [], []
    for s in ("0", "2", "10"):
        x, y = load(OUT / "scales_uncond" / f"scale_{s}" / "samples.npz")
        panels.append(grid(x, y))
        titles.append(f"scale {s}: judge {100 * rows['uncond', s][0]:.0f}%")
    save_panels(DOCS / "digits_scales.png", panels, titles,
                "unconditional digits model + classifier guidance (DDPM 100 steps); row k asks for digit k")


# -- 2. every sampler at its defaults -----------------------------------------------------------
SAMPLER_RUNS = [  # (name, CLI arguments); ddpm reuses the `scales` runs (same settings)
    ("ddpm", "--model uncond --scale 4 --sampler ddpm"),
    ("ddim", "--model uncond --scale 4 --sampler ddim"),
    ("dpm++", "--model uncond --scale 4 --sampler dpm++ --steps quad25"),
    ("pc", "--model uncond --scale 4 --sampler pc"),
    ("cond ddpm", "--model cond --scale 0 --sampler ddpm"),
    ("cond cfg 2", "--model cond --scale 0 --cfg-scale 2 --sampler ddpm"),
    ("cond cfg 2 + clf 2", "--model cond --scale 2 --cfg-scale 2 --sampler ddpm"),
    ("ode", "--model uncond --scale 4 --sampler ode"),  # adaptive RK45 over the whole batch: slow, see ODE_SAMPLES
    ("langevin + ncsn classifier", "--model ncsn --sampler langevin --scale 2"),
]
ODE_SAMPLES = 10
SLOW = {"ode", "langevin + ncsn classifier"}
REUSE = {"ddpm": OUT / "scales_uncond" / "scale_4", "cond ddpm": OUT / "scales_cond" / "scale_0"}


def samplers(args):
    n = args.num_samples
    rows = []
    langevin(args)
    for name, a in SAMPLER_RUNS:
        out = OUT / "samplers" / name.replace(" ", "_").replace("+", "p")
        if name in REUSE and (REUSE[name] / "samples.npz").exists():
            out = REUSE[name]
        k = ODE_SAMPLES if name in SLOW else n
        cmd = f"python sample_guided.py {a} --num-samples {k} --device cpu --out {out.relative_to(ROOT)}"
        sh(cmd, out)
        x, y = load(out / "samples.npz")
        acc, conf, sure, _ = judge_stats(x, y)
        rows.append((name, a, acc, conf, len(y)))
    print("\n| sampler | arguments | samples | judge accuracy | mean confidence |\n| --- | --- | --- | --- | --- |")
    for name, a, acc, conf, k in rows:
        print(f"| {name} | `{a}` | {k} | {100 * acc:.1f}% | {conf:.2f} |")
    langevin(args)


def langevin(args):
    ncsn = ROOT / "guided" / "assets" / "digits" / "ncsn.pt"
    if ncsn.exists():
        out = OUT / "samplers" / "langevin"
        sh(f"python sample_guided.py --model guided/assets/digits/ncsn.pt --sampler langevin --scale 0 "
           f"--num-samples {args.langevin_samples} --device cpu --out {out.relative_to(ROOT)}", out)
        x, y = load(out / "samples.npz")
        acc, conf, sure, p = judge_stats(x, None)
        pred = p.argmax(1)
        print(f"\nlangevin (ncsn.pt, unguided): {100 * sure:.0f}% of {len(x)} samples recognised by the judge with "
              f"confidence > 0.9; judge's predicted-class histogram {np.bincount(pred, minlength=10).tolist()}")
        rows = np.arange(len(x)) // 10
        save_panels(DOCS / "digits_langevin.png", [grid(x, rows, columns=10)],
                    [f"NCSN ({ncsn.name}) + annealed Langevin, unguided\n"
                     f"{100 * sure:.0f}% of {len(x)} recognised by the judge with p > 0.9"],
                    figsize=(5.5, 0.9 + 0.55 * (rows.max() + 1)))


# -- 3. SDEdit -------------------------------------------------------------------------------------
STROKES = {  # digit: polylines on a 16x16 canvas
    "1": [[(8, 2), (8, 13)], [(6, 4), (8, 2)]],
    "7": [[(3, 3), (12, 3), (7, 13)]],
    "0": [[(8, 2), (11, 4), (12, 8), (11, 12), (8, 13), (5, 12), (4, 8), (5, 4), (8, 2)]],
    "4": [[(10, 13), (10, 2), (3, 10), (13, 10)]],
}
T0S = ("0.2", "0.4", "0.6", "0.8", "1.0")


def draw_strokes():
    from PIL import Image, ImageDraw

    d = DOCS / "strokes"
    d.mkdir(parents=True, exist_ok=True)
    for k, lines in STROKES.items():
        im = Image.new("RGB", (16, 16))
        dr = ImageDraw.Draw(im)
        for line in lines:
            dr.line(line, fill=(255, 255, 255), width=2)
        im.save(d / f"stroke_{k}.png")
    return d


def sdedit(args):
    d = draw_strokes()
    n = args.num_samples
    rows, panels = [], []
    for k in STROKES:
        guide = np.asarray(__import__("PIL.Image").Image.open(d / f"stroke_{k}.png").convert("RGB"))
        row_imgs = [guide]
        for t0 in T0S:
            out = OUT / "sdedit" / f"{k}_t{t0}"
            sh(f"python sample_guided.py --model uncond --init-image docs/strokes/stroke_{k}.png --t0 {t0} "
               f"--class {k} --scale 4 --num-samples {n} --device cpu --out {out.relative_to(ROOT)}", out)
            x, y = load(out / "samples.npz")
            acc, conf, _, _ = judge_stats(x, y)
            diff = x.astype(np.float64) / 127.5 - guide.astype(np.float64)[None] / 127.5  # in [-1, 1] units
            l2 = float(np.mean(np.sqrt((diff ** 2).reshape(len(x), -1).sum(1))))
            mse = ((x.astype(np.float64) - guide[None]) ** 2).reshape(len(x), -1).mean(1)
            psnr = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
            rows.append((k, t0, acc, conf, l2, psnr, len(x)))
            row_imgs.append(x[0])
        panels.append(row_imgs)
    h = 16
    g = np.full((len(panels) * (h + 1) + 1, len(panels[0]) * (h + 1) + 1 + 2, 3), 255, np.uint8)
    for r, imgs in enumerate(panels):
        for c, img in enumerate(imgs):
            x0 = 1 + c * (h + 1) + (2 if c else 0)
            g[1 + r * (h + 1): 1 + r * (h + 1) + h, x0: x0 + h] = img
    save_panels(DOCS / "sdedit.png", [g.repeat(6, 0).repeat(6, 1)],
                ["SDEdit, uncond + classifier guidance (scale 4)\ncolumns: stroke guide, then t0 = " + ", ".join(T0S)],
                figsize=(5.5, 4.4))
    print("\n| guide | t0 | judge accuracy | judge confidence | mean L2 to guide | PSNR (dB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k, t0, acc, conf, l2, psnr, m in rows:
        print(f"| {k} | {t0} | {100 * acc:.0f}% | {conf:.2f} | {l2:.2f} | {psnr:.1f} |")
    print("\nper t0, over the guides:\n| t0 | judge accuracy | confidence | mean L2 | PSNR (dB) |\n| --- | --- | --- | --- | --- |")
    for t0 in T0S:
        sel = [r for r in rows if r[1] == t0]
        print(f"| {t0} | " + " | ".join(f"{v:.{p}f}" for v, p in zip(
            [100 * np.mean([r[2] for r in sel]), np.mean([r[3] for r in sel]), np.mean([r[4] for r in sel]),
             np.mean([r[5] for r in sel])], (0, 2, 2, 1))) + " |")


# -- 5. few-step quality ---------------------------------------------------------------------------
FEW = [("ddpm", "250"), ("ddim", "50"), ("ddim", "quad50"), ("dpm++", "quad50"), ("ddim", "25"), ("ddim", "quad25"),
       ("dpm++", "quad25"), ("ddim", "10"), ("ddim", "quad10"), ("dpm++", "quad10")]


def fewstep(args):
    from guided.evaluation.evaluate import evaluate

    ref = OUT / "reference_digits_16.npz"  # the sweeps' digits reference: 1,000 balanced training digits
    if not ref.exists():
        sh(f"python -m guided.cli.reference_batch digits --image-size 16 --num-samples 1000 --out {ref.relative_to(ROOT)}")
    n = args.num_samples
    rows = []
    for sampler, steps in FEW:
        out = OUT / "fewstep" / f"{sampler}_{steps}"
        t = time.time()
        sh(f"python sample_guided.py --model uncond --scale 4 --sampler {sampler} --steps {steps} "
           f"--num-samples {n} --device cpu --out {out.relative_to(ROOT)}", out)
        m = evaluate(out / "samples.npz", ref, "digits", progress=False)
        rows.append((sampler, steps, m["judge_accuracy"], m["fid"]))
    print("\n| sampler | steps | judge accuracy | FD (judge features) |\n| --- | --- | --- | --- |")
    for s, st, acc, fid in rows:
        print(f"| {s} | {st} | {100 * acc:.1f}% | {fid:.2f} |")


# -- 6. the extra x0 clip (--clip-guided) against the paper's arithmetic --------------------------
CLIP_RUNS = [("uncond", "ddim", "25"), ("uncond", "dpm++", "quad25"), ("uncond", "pc", "100"), ("cond", "ddim", "25")]
# (the adaptive ode without the clip ran past 1,000 evaluations in 2 minutes for 10 samples: not in the table)


def saturation(images) -> float:
    """The share of pixel values at 0 or 255."""
    return float(np.mean((images == 0) | (images == 255)))


def clip(args):
    from guided.evaluation.judge import digits_data

    real, _ = digits_data(16)
    print(f"saturated share of the real digits at 16x16: {100 * saturation(real):.1f}%")
    rows = []
    for model, sampler, steps in CLIP_RUNS:
        for flag in ("--clip-guided", "--no-clip-guided"):
            out = OUT / "clip" / f"{model}_{sampler}_{steps}_{flag.strip('-')}"
            cmd = (f"python sample_guided.py --model {model} --scale 4 --sampler {sampler} --steps {steps} {flag} "
                   f"--num-samples {args.num_samples} --device cpu --out {out.relative_to(ROOT)}")
            sh(cmd, out)
            x, y = load(out / "samples.npz")
            acc, conf, _, _ = judge_stats(x, y)
            rows.append((model, sampler, steps, flag, len(y), acc, conf, saturation(x)))
    print("\n| model | sampler | steps | clip | samples | judge accuracy | mean confidence | saturated pixels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model, sampler, steps, flag, k, acc, conf, sat in rows:
        print(f"| {model} | {sampler} | {steps} | `{flag}` | {k} | {100 * acc:.0f}% | {conf:.2f} | {100 * sat:.0f}% |")


# -- 4. guidance-scale sweeps with FID / IS / precision / recall in the judge's feature space ------
def sweep(args):
    import shutil

    for m, n in (("uncond", args.num_samples or 200), ("cond", args.num_samples or 100)):
        out = ROOT / "sweeps" / f"{m}_ddpm50"
        sh(f"python -m guided.cli.sweep --model {m} --scales 0,0.5,1,2,4,10 --num-samples {n} --sampler ddpm "
           f"--steps 50 --device cpu --out sweeps/{m}_ddpm50")  # resumes: evaluated scales are kept
        shutil.copy(out / "sweep.png", DOCS / f"sweep_{m}.png")
        print(f"\n{m}:\n" + (out / "results.csv").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("figure", choices=("scales", "samplers", "sdedit", "sweep", "fewstep", "clip"))
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--langevin-samples", type=int, default=20)
    args = p.parse_args(argv)
    args.num_samples = args.num_samples or {"scales": None, "samplers": 50, "sdedit": 8, "sweep": None, "fewstep": 50,
                                            "clip": 50}[args.figure]
    {"scales": scales, "samplers": samplers, "sdedit": sdedit, "sweep": sweep, "fewstep": fewstep,
     "clip": clip}[args.figure](args)


if __name__ == "__main__":
    sys.exit(main())
