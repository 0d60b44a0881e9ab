"""Training throughput of a config: images/s, peak memory and the fraction of the device's peak FLOP/s.

    python benchmarks/train_speed.py --config configs/imagenet64.yaml --batch-size 32 --precision bf16
    python benchmarks/train_speed.py --config configs/imagenet64_classifier.yaml --compile --channels-last
    python benchmarks/train_speed.py --config configs/imagenet64.yaml --on-cpu --batch-size 2 \
        --set train.objective.weighting=edm --set train.objective.prediction=edm   # a recipe's step

One step is what the trainer does: sample t, noise x_0 (random images, no data
needed), forward, loss (the hybrid loss for a score model, cross-entropy for a
classifier), backward, gradient clipping, AdamW, EMA. FLOPs are counted once with
torch.utils.flop_counter.FlopCounterMode over a whole step; utilisation is
FLOP/s over the device's dense peak for the precision (a table of NVIDIA parts;
--peak-tflops for others). On a machine without a GPU it measures the tiny
digits config on the CPU, against a measured float32 matmul peak, and says so (--on-cpu measures the
given config there anyway). --set applies config overrides, e.g. a training recipe
(guided.diffusion.recipes): its network (the preconditioned U-Net), loss weights and timesteps.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guided.config import load_config  # noqa: E402
from guided.diffusion.gaussian import create_diffusion  # noqa: E402
from guided.diffusion.losses import training_losses  # noqa: E402
from guided.speed import adamw  # noqa: E402
from guided.diffusion.objectives import objective_from_config  # noqa: E402
from guided.networks.unet import EncoderUNetModel  # noqa: E402
from guided.networks.preconditioned import build_unet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = {False: REPO / "configs" / "digits.yaml", True: REPO / "configs" / "digits_classifier.yaml"}
# Dense peak TFLOP/s by device-name fragment: (16-bit tensor cores, fp32 without TF32).
PEAKS = {"H200": (989.4, 66.9), "H100 PCIe": (756.0, 51.2), "H100": (989.4, 66.9), "A100": (312.0, 19.5),
         "A10G": (125.0, 31.2), "L4": (121.0, 30.3), "V100": (125.0, 15.7), "4090": (165.2, 82.6)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a training config (default: configs/digits.yaml, or "
                   "configs/digits_classifier.yaml with --classifier)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: the config's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--classifier", action="store_true", help="time the config's classifier (the default for a "
                   "config whose name contains 'classifier')")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, if not in the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override (repeatable)")
    p.add_argument("--on-cpu", action="store_true", help="measure the given config on the CPU too")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one step fewer)")
    return p.parse_args(argv)


def pick_config(args, cuda: bool):
    """(config path, cfg, time the classifier?, batch size)."""
    path = Path(args.config) if args.config else None
    classifier = args.classifier or (path is not None and "classifier" in path.stem)
    tiny = TINY[classifier]
    if path is None or (not cuda and not args.on_cpu and path.resolve() != tiny.resolve()):
        if path is not None:
            print(f"no GPU: measuring the tiny config {tiny.relative_to(REPO)} on the CPU instead of {path}")
        path = tiny
    cfg = load_config(path, args.set)
    return path, cfg, classifier, args.batch_size or (cfg.train.batch_size if cuda else 16)


def build(cfg, classifier: bool, device, args):
    node = cfg.classifier if classifier else cfg.model
    net = (EncoderUNetModel(node) if classifier else build_unet(cfg)).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = adamw(net.parameters(), lr=1e-4, weight_decay=cfg.train.weight_decay, device=device)  # the trainer's
    ema = [p.detach().clone() for p in net.parameters()]
    return net, (torch.compile(net) if args.compile else net), opt, ema, node


def make_step(cfg, classifier, net, model, opt, ema, node, batch, device, args):
    diffusion = create_diffusion(cfg.diffusion, timestep_respacing="")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    shape = (batch, node.in_channels, node.image_size, node.image_size)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x0 = torch.randn(shape, device=device).clamp(-1, 1).contiguous(memory_format=fmt)
    y = torch.randint(0, node.num_classes or 1, (batch,), device=device)

    objective = objective_from_config(cfg)  # the recipe's timesteps and loss weights (the trainer's)

    def step():
        t = objective.sampler.sample(batch, device)[0] if not classifier else \
            torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        w = None if classifier or objective.mse_weights is None else objective.mse_weights.to(device)[t]
        with autocast:
            if classifier:
                x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
                loss = F.cross_entropy(model(x_t, diffusion.model_t(t)).float(), y)
            else:
                kwargs = {"y": y} if node.num_classes is not None else {}
                net_fn = lambda x, tt: model(x, tt, **kwargs).float()  # noqa: E731
                loss = training_losses(diffusion, net_fn, x0, t, torch.randn_like(x0), mse_weight=w)["loss"].mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        (scaler.step(opt), scaler.update()) if scaler else opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1 - 0.9999)
    return step


def peak_flops(device, args) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "given with --peak-tflops"
    if device.type == "cpu":
        a = torch.randn(2048, 2048)
        for _ in range(2):
            a @ a
        t0, n = time.perf_counter(), 10
        for _ in range(n):
            a @ a
        return 2 * 2048**3 * n / (time.perf_counter() - t0), \
            f"measured fp32 matmul on {torch.get_num_threads()} CPU threads"
    name = torch.cuda.get_device_name(device)
    for key, (half, fp32) in PEAKS.items():
        if key in name:
            return (half if args.precision != "no" else fp32) * 1e12, f"{name} dense peak"
    return None, f"{name} is not in the table (pass --peak-tflops)"


def device_of(args) -> tuple[bool, torch.device]:
    """(GPU present?, the device), with --threads applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    return cuda, torch.device("cuda" if cuda else "cpu")


def measure(args, count_flops: bool = True) -> dict:
    """Time args.steps training steps after args.warmup; the figures as a dict (see main for the units)."""
    cuda, device = device_of(args)
    path, cfg, classifier, batch = pick_config(args, cuda)
    net, model, opt, ema, node = build(cfg, classifier, device, args)
    step = make_step(cfg, classifier, net, model, opt, ema, node, batch, device, args)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    flops = None
    if count_flops and not args.no_flops:
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(what="classifier" if classifier else "score model", config=str(shown), batch=batch,
                params_m=sum(p.numel() for p in net.parameters()) / 1e6, size=node.image_size, seconds=seconds,
                images_per_s=batch / seconds, peak_gib=peak / 2**30,
                peak_kind="torch allocator" if cuda else "process RSS", flops=flops,
                device=torch.cuda.get_device_name() if cuda else "CPU")


def main(argv=None):
    args = parse_args(argv)
    r = measure(args)
    print(f"{r['what']} of {r['config']}: {r['params_m']:.1f}M parameters, batch {r['batch']}, "
          f"{r['size']}x{r['size']}, precision {args.precision}, compile {args.compile}, "
          f"channels_last {args.channels_last}, device {r['device']}")
    print(f"  {r['images_per_s']:.1f} images/s ({r['seconds'] * 1000:.1f} ms/step over {args.steps} steps)")
    print(f"  peak memory {r['peak_gib']:.2f} GiB ({r['peak_kind']})")
    if r["flops"] is None:
        return
    peak, source = peak_flops(device_of(args)[1], args)
    achieved = r["flops"] / r["seconds"]
    share = f"{achieved / peak:.1%} of {peak / 1e12:.1f} TFLOP/s ({source})" if peak else source
    print(f"  {r['flops'] / 1e9:.1f} GFLOP/step, {achieved / 1e12:.3f} TFLOP/s = {share}")


if __name__ == "__main__":
    main()
