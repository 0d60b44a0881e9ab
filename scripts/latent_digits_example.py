"""Latent models end to end on the digits (docs: Training, "A latent model on the digits, end to end").

1. A small diffusers AutoencoderKL is trained on the digits training split (16x16 grey -> 4x4x4 latents,
   4x fewer numbers than pixels) with the latent-diffusion loss: reconstruction MSE plus 1e-6 x the KL of the
   posterior to N(0, I) (Rombach et al. 2022 sec. 3; diffusers ships the model, not a VAE loss). Its
   scaling_factor is 1 / the standard deviation of the training latents, as Stable Diffusion's 0.18215 was
   chosen (Rombach et al. sec. 4.3.2). Saved as a diffusers folder (config.json + safetensors).
2. The project's trainers, with data.vae: a DiT (model.arch: dit, patch 1 over the 4x4 grid, 16 tokens) and a
   latent noise-aware classifier (the ADM classifier on 4x4x4 latents), both on the linear chain (as latent
   diffusion and DiT; why not the digits' cosine chain: SCHEDULE below); the images are encoded once into a
   shared latent cache.
3. Samples drawn with the README's protocol (tests of docs/guide/digits-models.md: sample_guided.py, DDPM 100
   steps, 297 samples, seed 1) and judged by the digits judge: accuracy on the asked class and the judge-space
   FID to 1,000 training digits, beside the shipped pixel models' rows of the same protocol, so the number of
   network evaluations is the same.
Everything goes to --out; rerunning reuses what is there.

    OMP_NUM_THREADS=1 python scripts/latent_digits_example.py [--out runs/latent_digits]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
           latent_channels=4, norm_num_groups=16, sample_size=16)
KL_WEIGHT = 1e-6
DIT = ["model.arch=dit", "model.in_channels=4", "model.image_size=4", "model.patch_size=1", "model.hidden_size=128",
       "model.depth=6", "model.num_heads=4"]
# The linear chain, as latent diffusion and DiT use for latents: on the digits' cosine chain (beta_T = 0.999, kept
# for pixels, where x0 is clipped) the first reverse step multiplies the network's eps error by
# 1 / sqrt(1 - 0.999) = 31.6 and nothing clips latents: a DiT trained there sampled latents of std 30-500 with
# ddpm and ddim (1.0 with dpm++2m-sde on Karras levels, which skip that step). Its classifier shares the chain.
SCHEDULE = ["diffusion.noise_schedule=linear"]
CLASSIFIER = ["classifier.in_channels=4", "classifier.image_size=4", "classifier.channel_mult=[1,2]",
              "classifier.attention_resolutions=[2]"]
RUNS = {  # name -> sample_guided.py arguments, after --model DIT_RUN (DDPM 100 steps, as the pixel rows)
    "latent DiT, scale 0": "--scale 0",
    "latent DiT + latent classifier, scale 1": "--scale 1",
    "latent DiT + latent classifier, scale 4": "--scale 4",
    "latent DiT, classifier-free 2": "--scale 0 --cfg-scale 2",
}


def train_vae(folder: Path, steps: int, batch: int, seed: int = 0) -> float:
    """The VAE on the digits training split (module docstring); returns its training seconds."""
    from diffusers import AutoencoderKL

    from guided.data.digits import DigitsDataset

    torch.manual_seed(seed)
    data = DigitsDataset(16, split="train", channels=1)
    x_all = torch.stack([data[i][0] for i in range(len(data))])  # [-1, 1]
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    gen, t0 = torch.Generator().manual_seed(seed), time.time()
    for step in range(1, steps + 1):
        x = x_all[torch.randint(len(x_all), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = ((vae.decode(z).sample - x) ** 2).mean()
        loss = recon + KL_WEIGHT * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps:
            print(f"vae step {step}: reconstruction MSE {recon.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        std = float(vae.encode(x_all).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(folder, safe_serialization=True)
    return time.time() - t0


def reconstruction(vae: Path) -> tuple[float, float]:
    """(judge accuracy, judge FID to the held-out digits) of the VAE's reconstructions of the held-out digits."""
    from guided.evaluation.judge import digits_data, load_judge, split_indices
    from guided.generation.images import to_uint8
    from guided.networks.diffusers import load_vae
    from guided.training.probe import judge_fid

    space, (images, labels), held = load_vae(vae), digits_data(16), split_indices()[1]
    x = torch.from_numpy(images[held]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = to_uint8(space.finish(space.encode(x)))  # grey as RGB, as the writer stores it
    return float(load_judge(16).accuracy(out, labels[held])), float(judge_fid(out))


def train(script: str, config: str, overrides: list[str], out: Path) -> float:
    """One of the project's trainers (train_diffusion.py / train_classifier.py); its wall seconds."""
    cmd = [sys.executable, str(REPO / script), "--config", str(REPO / "configs" / config), *overrides,
           f"train.out_dir={out}"]
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - t0


def sample_rows(dit: Path, clf: Path, out: Path, n: int) -> list:
    """[(name, n, FID, accuracy, samples per second)] of the RUNS, with the pixel rows' protocol."""
    from digits_quality import reference, score

    from guided.evaluation.judge import load_judge
    from guided.evaluation.metrics import feature_stats

    ref_stats = feature_stats(load_judge(16).extract(reference())["pool"])
    rows = []
    for name, cli in RUNS.items():
        folder = out / "".join(c if c.isalnum() else "_" for c in name)
        t0 = time.time()
        if not (folder / "samples.npz").exists():
            cmd = (f"{sys.executable} sample_guided.py --model {dit} --classifier {clf} {cli} --sampler ddpm "
                   f"--steps 100 --num-samples {n} --seed 1 --out {folder}")
            print("$", cmd, flush=True)
            subprocess.run(shlex.split(cmd), cwd=REPO, check=True)
        seconds = time.time() - t0
        with np.load(folder / "samples.npz") as f:
            fid, acc = score(f["arr_0"], f["arr_1"], ref_stats)[:2]
        rows.append((name, cli, n, fid, acc, n / seconds if seconds > 1 else None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/latent_digits")
    ap.add_argument("--vae-steps", type=int, default=3000)
    ap.add_argument("--dit-steps", type=int, default=6000)
    ap.add_argument("--classifier-steps", type=int, default=3000)
    ap.add_argument("--num-samples", type=int, default=297)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    vae, dit, clf, cache = out / "vae", out / "dit", out / "classifier", out / "latents"
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    latent = [f"data.vae={vae}", f"data.latent_cache={cache}", "data.image_size=16"]
    if not (vae / "config.json").is_file():
        report["vae_seconds"] = round(train_vae(vae, args.vae_steps, 64))
    if not (dit / "ema.pt").is_file():
        report["dit_seconds"] = round(train("train_diffusion.py", "digits.yaml", [
            *DIT, *SCHEDULE, *latent, f"train.steps={args.dit_steps}", "train.snapshot_steps=[]", "train.probe.every=2000"], dit))
    if not (clf / "model.pt").is_file():
        report["classifier_seconds"] = round(train("train_classifier.py", "digits_classifier.yaml", [
            *CLASSIFIER, *SCHEDULE, *latent, f"train.steps={args.classifier_steps}", "train.export_dtype=fp32"], clf))
    report["reconstruction_accuracy"], report["reconstruction_fid"] = reconstruction(vae)
    rows = sample_rows(dit, clf, out / "samples", args.num_samples)
    report["rows"] = [dict(zip(("name", "args", "n", "fid", "accuracy", "samples_per_s"), r)) for r in rows]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print("| samples | n | judge accuracy | FID to 1,000 training digits (x floor 5.0) |\n| --- | --- | --- | --- |")
    for name, cli, n, fid, acc, _ in rows:
        print(f"| {name} (`{cli}`) | {n} | {acc:.1%} | {fid:.1f} ({fid / 5.0:.2f}x) |")
    print(f"VAE reconstructions of the held-out digits: judge accuracy {report['reconstruction_accuracy']:.1%}, "
          f"FID to them {report['reconstruction_fid']:.2f}")
    print(f"training: VAE {report.get('vae_seconds')} s, DiT {report.get('dit_seconds')} s, "
          f"classifier {report.get('classifier_seconds')} s (wall, this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
