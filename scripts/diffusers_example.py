"""Guiding a diffusers model the project did not make (README: "Guiding a diffusers model").

1. A tiny diffusers UNet2DModel is trained UNCONDITIONALLY on the digits training split (8x8 grey, the
   data set's own size, to fit a few CPU minutes)
   with diffusers' own training step (DDPMScheduler.add_noise, MSE on the noise, AdamW, EMA, as
   diffusers' examples/unconditional_image_generation does) and saved as a diffusers pipeline folder
   (unet/ + scheduler/, safetensors).
2. The project's noise-aware classifier is trained for THAT model's chain: train_classifier.py with the
   digits classifier config and diffusion.betas_from=<the pipeline folder> (its scheduler config).
3. The unconditional model is steered to each digit by classifier guidance (Dhariwal & Nichol
   Algorithm 1, ddpm) and judged by the project's digits judge (guided.evaluation.judge): accuracy on
   the asked class at scale 0 (chance: ~10%) and guided.
Everything is regenerated into --out; rerunning reuses what is already there.
    OMP_NUM_THREADS=1 python scripts/diffusers_example.py [--out runs/diffusers_digits]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SIZE = 8
UNET = dict(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8, attention_head_dim=32)


def train_unet(folder: Path, steps: int, batch: int, seed: int = 0):
    """diffusers' unconditional training step on the digits training split; writes a DDPMPipeline folder."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from guided.data.digits import DigitsDataset

    torch.manual_seed(seed)
    data = DigitsDataset(SIZE, split="train", channels=1)
    x_all = torch.stack([data[i][0] for i in range(len(data))])  # [-1, 1]
    unet = UNet2DModel(**UNET)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-6)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4)
    gen, t0 = torch.Generator().manual_seed(seed), time.time()
    for step in range(1, steps + 1):
        x0 = x_all[torch.randint(len(x_all), (batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr.step()
        ema.step(unet.parameters())
        if step % 500 == 0 or step == steps:
            print(f"unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(folder)
    return time.time() - t0


def train_classifier(pipeline: Path, out: Path, steps: int):
    """The project's train_classifier.py on the digits, its diffusion taken from the model's scheduler."""
    cmd = [sys.executable, str(REPO / "train_classifier.py"), "--config", str(REPO / "configs/digits_classifier.yaml"),
           f"diffusion.betas_from={pipeline}", f"classifier.image_size={SIZE}", "classifier.attention_resolutions=[4]",
           f"train.steps={steps}", "train.eval_every=0", "train.save_every=100000",
           f"train.out_dir={out}", "train.export_dtype=fp32"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - t0


def judge_scales(pipeline: Path, classifier: Path, scales, per_class: int, steps: str, seed: int = 0):
    """{scale: (accuracy on the asked class, per-class accuracies)} of ddpm samples judged by the digits judge."""
    from guided.evaluation.judge import load_judge
    from guided.generation import SampleOptions, load_pipeline, sample_batch

    p, judge = load_pipeline(str(pipeline), classifier=str(classifier)), load_judge(SIZE)
    labels = [c for c in range(10) for _ in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]
    out = {}
    for s in scales:
        opts = SampleOptions(sampler="ddpm", steps=steps, scale=s)
        x = torch.cat([sample_batch(p, labels[i:i + 100], seeds[i:i + 100], opts) for i in range(0, len(labels), 100)])
        hit = judge.predict(x) == np.array(labels)
        out[s] = (float(hit.mean()), [float(hit[np.array(labels) == c].mean()) for c in range(10)])
        print(f"scale {s}: judge accuracy on the asked class {out[s][0]:.3f}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/diffusers_digits")
    ap.add_argument("--unet-steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classifier-steps", type=int, default=600)
    ap.add_argument("--scales", default="0,2,5,10")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--steps", default="50", help="ddpm respacing (the scheduler's own spacing)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline, clf = out / "pipeline", out / "classifier"
    report = {}
    if not (pipeline / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        report["unet_seconds"] = round(train_unet(pipeline, args.unet_steps, args.batch))
    if not (clf / "model.pt").is_file():
        report["classifier_seconds"] = round(train_classifier(pipeline, clf, args.classifier_steps))
    results = judge_scales(pipeline, clf, [float(s) for s in args.scales.split(",")], args.per_class, args.steps)
    report["judge"] = {str(s): {"accuracy": a, "per_class": pc} for s, (a, pc) in results.items()}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print("| scale | judge accuracy on the asked class | worst class |\n|---|---|---|")
    for s, (a, pc) in results.items():
        print(f"| {s:g} | {a:.1%} | {min(pc):.0%} (digit {int(np.argmin(pc))}) |")


if __name__ == "__main__":
    main()
