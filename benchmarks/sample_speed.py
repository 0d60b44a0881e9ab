"""Time of one reverse step, guided (score model + classifier forward and backward) and unguided,
and of whole guided runs of a batch through the library's sampler.

    python benchmarks/sample_speed.py --preset 64x64 --batch-size 64 --precision bf16 --run dpm++2m-sde:karras20
    python benchmarks/sample_speed.py --preset 256x256 --batch-size 16 --channels-last --compile
    python benchmarks/sample_speed.py --preset dit-xl-2 --batch-size 16 --run dpm++2m-sde:karras20   # needs diffusers

Presets build the paper's released architectures (random weights: speed does not depend on them) from
their published flags; `dit-xl-2` is a latent model: DiT-XL/2 (Peebles & Xie 2023, diffusers'
DiTTransformer2DModel) on the 32x32x4 latents of a Stable Diffusion AutoencoderKL, guided by
configs/imagenet256_latent_classifier.yaml's latent classifier, and also times the VAE decode of the
batch (`dit-tiny`: the same at test size). Without a GPU the default is the digits architecture on the
CPU, and the output says so. The step is the library's own `ddpm_step` with the classifier gradient as
cond_fn; `--run SAMPLER:STEPS` times a whole guided run of the batch with `sample_batch`, the function
sample_guided.py draws with (the prior draw, every step and, for a latent model, the decode): what is
timed is what users run.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from guided.networks import adm  # noqa: E402
from guided.config import load_config  # noqa: E402
from guided.diffusion.gaussian import create_diffusion  # noqa: E402
from guided.diffusion.space import PIXELS, LatentSpace  # noqa: E402
from guided.generation import Pipeline, SampleOptions, sample_batch  # noqa: E402
from guided.guidance.terms import classifier_cond_fn  # noqa: E402
from guided.samplers.discrete import ddpm_step  # noqa: E402
from guided.networks.unet import EncoderUNetModel, UNetModel  # noqa: E402
from train_speed import device_of, peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# DiT-XL/2 (Peebles & Xie 2023, table 1: 28 layers, hidden 1152, 16 heads, patch 2) on 32x32x4 latents, 1000
# classes, learned sigma; the Stable Diffusion VAE (sd-vae-ft-ema's config: 4 blocks, 128-512 channels, 8x down).
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
DIT_TINY = dict(DIT_XL_2, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8)
VAE_TINY = dict(SD_VAE, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16)
TINY_CLASSIFIER = ["classifier.image_size=8", "classifier.model_channels=32", "classifier.num_res_blocks=1",
                   "classifier.channel_mult=[1,2]", "classifier.attention_resolutions=[4]",
                   "classifier.num_head_channels=32"]
PRESETS = ("64x64", "128x128", "256x256", "512x512", "digits", "dit-xl-2", "dit-tiny")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=PRESETS, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--run", action="append", default=[], metavar="SAMPLER:STEPS",
                   help="also time one whole guided run of the batch with sample_batch, e.g. ddpm:250 or "
                        "dpm++2m-sde:karras20 (the few-step default); repeatable")
    return p.parse_args(argv)


def build(preset: str):
    """(score network, classifier, DiffusionConfig node, data space) of a preset, random weights."""
    if preset == "digits":
        cfg = load_config(REPO / "configs" / "digits.yaml")
        clf = load_config(REPO / "configs" / "digits_classifier.yaml")
        return UNetModel(cfg.model), EncoderUNetModel(clf.classifier), cfg.diffusion, PIXELS
    if preset.startswith("dit"):
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        from guided.networks.diffusers import DiffusersDiT

        tiny = preset == "dit-tiny"
        cfg = load_config(REPO / "configs" / "imagenet256_latent_classifier.yaml", TINY_CLASSIFIER if tiny else [])
        schedule = load_config(REPO / "configs" / "imagenet256_latent.yaml").diffusion  # linear, 1000, learned range
        gaussian = create_diffusion(schedule, "1000")
        dit = DiffusersDiT(DiTTransformer2DModel(**(DIT_TINY if tiny else DIT_XL_2)), gaussian.alphas_cumprod)
        vae = AutoencoderKL(**(VAE_TINY if tiny else SD_VAE)).eval().requires_grad_(False)
        return dit, EncoderUNetModel(cfg.classifier), schedule, LatentSpace(vae=vae, scaling_factor=0.18215, batch=64)
    model = adm.create_model(adm.PUBLISHED[f"{preset}_diffusion.pt"])
    classifier = adm.create_classifier(adm.PUBLISHED[f"{preset}_classifier.pt"])
    return model, classifier, adm.diffusion_config(adm.PUBLISHED[f"{preset}_diffusion.pt"]), PIXELS


def count_flops_of(model_fn, classifier, x, y, guided) -> int:
    """FLOPs of one step: the model forward, plus the classifier forward and backward to x.
    (FlopCounterMode cannot watch autograd.grad, so the gradient is taken with backward here.)"""
    t = torch.full((len(x),), 100, device=x.device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model_fn(x, t)
        if guided:
            x_in = x.detach().requires_grad_(True)
            torch.log_softmax(classifier(x_in, t), -1)[torch.arange(len(y)), y].sum().backward()
    return counter.get_total_flops()


def timed(fn, repeats: int, warmup: int, sync) -> float:
    """Milliseconds per call of fn, after warm-up calls (the compiler's and the allocator's first work)."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats * 1000


def workloads(args) -> SimpleNamespace:
    """The timed work of a preset on this device: `steps` {"unguided", "guided"} (one reverse step each),
    `decode` (a latent model's VAE decode of the batch, else None), `run(spec)` (a whole guided run of the
    batch with sample_batch), and what they were built from (benchmarks/profile_step.py profiles them)."""
    cuda, device = device_of(args)
    preset = args.preset or ("64x64" if cuda else "digits")
    batch = args.batch_size or (64 if cuda else 16)
    model, classifier, diff_cfg, space = build(preset)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model, classifier = (m.to(device, memory_format=fmt).eval() for m in (model, classifier))
    if space is not PIXELS:
        space.vae.to(device, memory_format=fmt)
    size, channels, conditional = model.cfg.image_size, model.cfg.in_channels, model.num_classes is not None
    y = torch.randint(0, classifier.cfg.num_classes, (batch,), device=device)
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=fmt)
    if args.compile:
        model, classifier = torch.compile(model), torch.compile(classifier)
    diffusion = create_diffusion(diff_cfg, "250")
    model_fn = (lambda x, t: model(x, t, y=y)) if conditional else (lambda x, t: model(x, t))
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]) \
        if args.precision != "no" else nullcontext()

    def reverse_step(cond):
        def step():
            with torch.no_grad(), autocast:
                return ddpm_step(diffusion, model_fn, x, 100, cond_fn=cond, clip_denoised=space.bounded)[0]
        return step

    def decode():
        with torch.no_grad(), autocast:
            return space.finish(x)
    pipeline = Pipeline(model, diff_cfg, classifier, space=space)
    precision = {"no": "fp32"}.get(args.precision, args.precision)

    def run(spec: str):
        sampler, steps = spec.split(":")
        opts = SampleOptions(sampler=sampler, steps=steps, scale=1.0, precision=precision)
        return sample_batch(pipeline, y.tolist(), range(batch), opts, device=device)
    return SimpleNamespace(preset=preset, batch=batch, cuda=cuda, x=x, y=y, model_fn=model_fn, classifier=classifier,
                           sync=torch.cuda.synchronize if cuda else (lambda: None), run=run,
                           steps={"unguided": reverse_step(None),
                                  "guided": reverse_step(classifier_cond_fn(classifier, y, 1.0))},
                           decode=None if space is PIXELS else decode)


def measure(args, count_flops: bool = True) -> dict:
    """Time args.steps reverse steps, unguided and guided, after args.warmup (with a latent model also the
    VAE decode of the batch, and one whole guided run per args.run); the figures as a dict (main: the units)."""
    w = workloads(args)
    if w.cuda:
        torch.cuda.reset_peak_memory_stats()
    out = dict(preset=w.preset, batch=w.batch, device=torch.cuda.get_device_name() if w.cuda else "CPU")
    for name, step in w.steps.items():
        out[f"{name}_ms"] = timed(step, args.steps, args.warmup, w.sync)
        out[f"{name}_flops"] = count_flops and count_flops_of(w.model_fn, w.classifier, w.x, w.y, name == "guided")
    if w.decode is not None:
        out["decode_ms"] = timed(w.decode, max(1, args.steps // 5), 1, w.sync)
    out["run_images_per_s"] = []  # one per args.run, in its order, after a 2-step run of the same sampler
    for spec in args.run:
        sampler, steps = spec.split(":")
        w.run(f"{sampler}:{re.sub(r'[0-9]+', '2', steps)}")  # the compiler's and allocator's first work, not timed
        out["run_images_per_s"].append(w.batch / timed(lambda s=spec: w.run(s), 1, 0, w.sync) * 1000)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if w.cuda else None
    return out


def main(argv=None):
    args = parse_args(argv)
    r = measure(args)
    peak, source = peak_flops(device_of(args)[1], args)
    where = r["device"] if r["device"] != "CPU" else \
        "CPU (no GPU here" + (": the digits architecture, not ImageNet)" if r["preset"] == "digits" else ")")
    print(f"{r['preset']} model + classifier, batch {r['batch']}, precision {args.precision}, compile {args.compile}, "
          f"channels_last {args.channels_last}, device {where}")
    for name in ("unguided", "guided"):
        ms, flops = r[f"{name}_ms"], r[f"{name}_flops"]
        share = f"{flops / ms * 1000 / peak:.1%} of peak ({source})" if peak else source
        print(f"  {name:>9}: {ms:8.1f} ms/step, {flops / 1e9:8.1f} GFLOP, {share}")
    if "decode_ms" in r:
        print(f"  VAE decode of the batch: {r['decode_ms']:.1f} ms")
    for spec, speed in zip(args.run, r["run_images_per_s"]):
        print(f"  a whole guided {spec} run (sample_batch): {speed:.2f} images/s")
    if r["peak_gib"] is not None:
        print(f"  peak memory {r['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
