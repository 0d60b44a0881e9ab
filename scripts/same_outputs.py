"""Behaviour check for refactors: the README's commands on the shipped models, outputs fingerprinted.

    OMP_NUM_THREADS=1 python scripts/same_outputs.py record before.json   # on the old tree
    OMP_NUM_THREADS=1 python scripts/same_outputs.py check before.json    # on the new tree

Every sampler at its default and every guidance term (few samples each), a sweep, SDEdit with
and without a mask, and a few steps of each trainer. A sampling command is fingerprinted by the
sha256 of its samples.npz (byte-identical or not); a training command by the sha256 of every
tensor of the model.pt / ema.pt it writes (the embedded config may be laid out anew). `check`
prints one line per command and exits 1 if any differs. Commands run in a temporary folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
S = "sample_guided.py --num-samples 3 --batch-size 3 --sampler ddpm"  # the paper's sampler, as before the few-step default
SAMPLING = {
    "ddpm cond": f"{S} --class 3 --scale 4",
    "ddpm uncond": f"{S} --model uncond --class 7 --scale 10",
    "scales": f"{S} --model uncond --class 2 --scales 0,4 --steps 20",
    "cfg": f"{S} --cfg-scale 2 --scale 0 --class 1",
    "dpm++": f"{S} --sampler dpm++ --steps quad25 --class 5 --scale 4",
    "ddim": f"{S} --sampler ddim --model uncond --class 4 --scale 4",
    "ddim eta": f"{S} --sampler ddim --eta 1 --steps ddim25 --class 4 --scale 2",
    "ddim noclip": f"{S} --sampler ddim --no-clip-guided --steps 20 --class 4 --scale 2",
    "pc": f"{S} --sampler pc --steps 30 --model uncond --class 6 --scale 4",
    "ode": "sample_guided.py --num-samples 2 --sampler ode --model uncond --class 3 --scale 4",
    "langevin": "sample_guided.py --num-samples 2 --model ncsn --sampler langevin --scale 2 --class 8",
    "ncsn pc": "sample_guided.py --num-samples 2 --model ncsn --sampler pc --steps 20 --class 8 --scale 2",
    "sdedit": f"{S} --model uncond --init-image docs/strokes/stroke_7.png --t0 0.6 --class 7 --scale 4",
    "sdedit ddim": f"{S} --sampler ddim --model uncond --init-image docs/strokes/stroke_1.png --t0 0.4 --class 1",
    "sdedit mask": f"{S} --model uncond --init-image docs/strokes/stroke_0.png --mask docs/strokes/stroke_4.png "
                   "--t0 0.8 --class 0 --scale 2 --steps 30",
    "sdedit pc": f"{S} --sampler pc --steps 20 --model uncond --init-image docs/strokes/stroke_7.png --t0 0.5 --class 7",
    "interval": f"{S} --model uncond --class 7 --scale 4 --interval 0.28,5.42",
    "schedule": f"{S} --model uncond --class 7 --scale 4 --schedule noisy --no-calibration --steps 25",
    "autoguide": f"{S} --model cond --class 7 --autoguide-scale 2",
    "x0": f"{S} --model uncond --class 7 --x0-scale 4",
    "x0 ddim": f"{S} --model uncond --class 7 --x0-scale 4 --scale 0 --sampler ddim --steps 20 --x0-interval 0,3",
    "cfg interval": f"{S} --model cond --cfg-scale 2 --cfg-interval 0.28,5.42 --scale 1",
    "ddpm score": f"{S} --model uncond --class 7 --scale 4 --ddpm-form score",
    "random classes": "sample_guided.py --num-samples 5 --batch-size 2 --class-sampling random --steps 20 --scale 2",
    "bf16": f"{S} --precision bf16 --steps 20 --class 9 --scale 3",
    "default": "sample_guided.py --num-samples 3 --batch-size 3 --class 3 --scale 2",
    "dpm++2m-sde logsnr": "sample_guided.py --num-samples 3 --sampler dpm++2m-sde --steps logsnr10 --class 5 "
                          "--scale 2 --sampler-arg threshold=dynamic",
    "dpm++3m": "sample_guided.py --num-samples 3 --sampler dpm++3m --steps karras10 --class 2 --cfg-scale 2 --scale 0",
    "edm": "sample_guided.py --num-samples 3 --sampler edm --steps karras8 --class 6 --autoguide-scale 2",
    "fewstep sdedit": "sample_guided.py --num-samples 2 --sampler dpm++2m-sde --steps 20 --model uncond "
                      "--init-image docs/strokes/stroke_7.png --t0 0.5 --class 7 --scale 2",
}
SWEEP = ("{sweep} --model uncond --scales 0,2 --num-samples 4 --sampler dpm++ --steps quad10 --features digits "
         "--class 3")
TRAIN = "--config {cfg} train.steps=3 train.batch_size=8 train.log_every=1 train.save_every=3 train.tracker=none"
TRAINING = {
    "train eps": f"train_diffusion.py {TRAIN.format(cfg='digits')}",
    "train vp_dsm": f"train_diffusion.py {TRAIN.format(cfg='digits')} train.objective=vp_dsm model.learn_sigma=false",
    "train ncsn": f"train_diffusion.py {TRAIN.format(cfg='digits_ncsn')}",
    "train classifier": f"train_classifier.py {TRAIN.format(cfg='digits_classifier')} "
                        "train.calibration_bands=2 train.eval_images=64",
    "train ncsn classifier": f"train_classifier.py {TRAIN.format(cfg='digits_ncsn_classifier')} "
                             "train.eval_images=64",
}


def sweep_module() -> str:
    return "-m guided.cli.sweep" if (ROOT / "guided" / "cli" / "sweep.py").exists() else "-m guided.sweep"


def run(cmd: str, cwd: Path) -> None:
    argv = [sys.executable, *cmd.split()]
    if argv[1].endswith(".py"):
        argv[1] = str(ROOT / argv[1])
    argv = [a.replace("docs/", str(ROOT / "docs") + "/") for a in argv]
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        raise SystemExit(f"{cmd} failed ({r.returncode}):\n{r.stderr[-2000:]}")


def digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def digest_weights(path: Path) -> str:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    sd = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    h = hashlib.sha256()
    for k in sorted(k for k, v in sd.items() if hasattr(v, "numpy")):
        h.update(k.encode() + sd[k].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprints(only=None) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, cmd in SAMPLING.items():
            if only and name not in only:
                continue
            run(f"{cmd} --out {tmp / name.replace(' ', '_')}", tmp)
            files = sorted((tmp / name.replace(" ", "_")).rglob("samples.npz"))
            out[name] = [digest_file(f) for f in files]
            print(f"{name}: {out[name]}", flush=True)
        if not only or "sweep" in only:
            run(SWEEP.format(sweep=sweep_module()) + f" --out {tmp / 'sweep'}", tmp)
            out["sweep"] = [digest_file(f) for f in sorted((tmp / "sweep").rglob("samples.npz"))]
            print(f"sweep: {out['sweep']}", flush=True)
        for name, cmd in TRAINING.items():
            if only and name not in only:
                continue
            folder = tmp / name.replace(" ", "_")
            run(f"{cmd} train.out_dir={folder}", tmp)
            out[name] = [digest_weights(folder / f) for f in ("model.pt", "ema.pt") if (folder / f).exists()]
            print(f"{name}: {out[name]}", flush=True)
    return out


def main(argv) -> int:
    if len(argv) < 2 or argv[0] not in ("record", "check"):
        print(__doc__)
        return 2
    only = set(argv[2:]) or None
    got = fingerprints(only)
    if argv[0] == "record":
        old = json.loads(Path(argv[1]).read_text()) if Path(argv[1]).exists() else {}
        Path(argv[1]).write_text(json.dumps({**old, **got}, indent=1) + "\n")
        return 0
    want = json.loads(Path(argv[1]).read_text())
    bad = [k for k in got if got[k] != want.get(k)]
    for k in got:
        print(f"{'SAME' if k not in bad else 'DIFFERENT'}  {k}")
    print(f"{len(got) - len(bad)} of {len(got)} commands give the same outputs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
