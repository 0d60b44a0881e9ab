"""Time of one reverse step, guided (score model + classifier forward and backward) and unguided.

    python benchmarks/sample_speed.py --preset 64x64 --batch-size 64 --precision bf16
    python benchmarks/sample_speed.py --preset 256x256 --batch-size 16 --channels-last --compile

Presets build the paper's released architectures (random weights: speed does
not depend on them) from their published flags; without a GPU the default is
the digits architecture on the CPU, and the output says so. The step is the
library's own `ddpm_step` with the classifier gradient as cond_fn, so what is
timed is what sample_guided.py runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from guided.networks import adm  # noqa: E402
from guided.config import load_config  # noqa: E402
from guided.diffusion.gaussian import create_diffusion  # noqa: E402
from guided.guidance.terms import classifier_cond_fn  # noqa: E402
from guided.samplers.discrete import SampleNoise, ddpm, ddpm_step  # noqa: E402
from guided.networks.unet import EncoderUNetModel, UNetModel  # noqa: E402
from train_speed import device_of, peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("64x64", "128x128", "256x256", "512x512", "digits"), default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--loop", type=int, default=0, metavar="STEPS",
                   help="also time one whole guided DDPM run of STEPS steps (images/s), e.g. 250")
    return p.parse_args(argv)


def build(preset: str):
    if preset == "digits":
        cfg = load_config(REPO / "configs" / "digits.yaml")
        clf = load_config(REPO / "configs" / "digits_classifier.yaml")
        return UNetModel(cfg.model), EncoderUNetModel(clf.classifier), cfg.diffusion
    model = adm.create_model(adm.PUBLISHED[f"{preset}_diffusion.pt"])
    classifier = adm.create_classifier(adm.PUBLISHED[f"{preset}_classifier.pt"])
    return model, classifier, adm.diffusion_config(adm.PUBLISHED[f"{preset}_diffusion.pt"])


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


def measure(args, count_flops: bool = True) -> dict:
    """Time args.steps reverse steps, unguided and guided, after args.warmup (and with args.loop one
    whole guided run); the figures as a dict (see main for the units)."""
    cuda, device = device_of(args)
    preset = args.preset or ("64x64" if cuda else "digits")
    batch = args.batch_size or (64 if cuda else 16)
    model, classifier, diff_cfg = build(preset)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model, classifier = (m.to(device, memory_format=fmt).eval() for m in (model, classifier))
    size, conditional = model.cfg.image_size, model.num_classes is not None
    y = torch.randint(0, classifier.cfg.num_classes, (batch,), device=device)
    x = torch.randn(batch, model.cfg.in_channels, size, size, device=device).contiguous(memory_format=fmt)
    if args.compile:
        model, classifier = torch.compile(model), torch.compile(classifier)
    diffusion = create_diffusion(diff_cfg, "250")
    model_fn = (lambda x, t: model(x, t, y=y)) if conditional else (lambda x, t: model(x, t))
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]) \
        if args.precision != "no" else nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = dict(preset=preset, batch=batch, device=torch.cuda.get_device_name() if cuda else "CPU")
    for name, cond in (("unguided", None), ("guided", classifier_cond_fn(classifier, y, 1.0))):
        def step():
            with torch.no_grad(), autocast:
                return ddpm_step(diffusion, model_fn, x, 100, cond_fn=cond)[0]
        for _ in range(args.warmup):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        out[f"{name}_ms"] = (time.perf_counter() - t0) / args.steps * 1000
        out[f"{name}_flops"] = count_flops and count_flops_of(model_fn, classifier, x, y, cond)
    if args.loop:
        loop = create_diffusion(diff_cfg, str(args.loop))
        noise = SampleNoise(range(batch), device)
        sync()
        t0 = time.perf_counter()
        with autocast:
            ddpm(loop, model_fn, noise.randn(x.shape[1:]), cond_fn=classifier_cond_fn(classifier, y, 1.0), noise=noise)
        sync()
        out["loop_images_per_s"] = batch / (time.perf_counter() - t0)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return out


def main(argv=None):
    args = parse_args(argv)
    r = measure(args)
    peak, source = peak_flops(device_of(args)[1], args)
    where = r["device"] if r["device"] != "CPU" else "CPU (no GPU here: the digits architecture, not ImageNet)"
    print(f"{r['preset']} model + classifier, batch {r['batch']}, precision {args.precision}, compile {args.compile}, "
          f"channels_last {args.channels_last}, device {where}")
    for name in ("unguided", "guided"):
        ms, flops = r[f"{name}_ms"], r[f"{name}_flops"]
        share = f"{flops / ms * 1000 / peak:.1%} of peak ({source})" if peak else source
        print(f"  {name:>9}: {ms:8.1f} ms/step, {flops / 1e9:8.1f} GFLOP, {share}")
    if args.loop:
        print(f"  a whole {args.loop}-step guided DDPM run: {r['loop_images_per_s']:.2f} images/s")
    if r["peak_gib"] is not None:
        print(f"  peak memory {r['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
