"""Where the time of one benchmark step goes: torch.profiler over a few steps after warm-up, the top
kernels (CUDA) or operators (CPU) by self time, and a Chrome trace to open in Perfetto.

    python benchmarks/profile_step.py guided -- --preset 64x64 --batch-size 64 --precision bf16 --channels-last
    python benchmarks/profile_step.py train -- --config configs/imagenet64.yaml --batch-size 64 --compile
    python benchmarks/profile_step.py decode --trace $OUT/trace.json -- --preset dit-xl-2 --batch-size 16

The workload is the benchmark's own (benchmarks/sample_speed.py: `guided` and `unguided` reverse steps,
`decode` a latent model's VAE decode, `run` one whole guided run of --run's first spec;
benchmarks/train_speed.py: `train`), so the profile explains the figure the suite printed. Arguments
after `--` are the benchmark's.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sample_speed  # noqa: E402
import train_speed  # noqa: E402

WORK = ("guided", "unguided", "decode", "run", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", choices=WORK)
    p.add_argument("--repeats", type=int, default=5, help="profiled calls, after --warmup")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--trace", metavar="JSON", help="also write a Chrome trace here")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after it: the benchmark's own arguments
    args = p.parse_args(argv[:split])
    args.bench_args = argv[split + 1:]
    return args


def workload(args):
    """(the function to profile, sync, a line saying what it is)."""
    if args.work == "train":
        b = train_speed.parse_args(args.bench_args)
        cuda, device = train_speed.device_of(b)
        path, cfg, classifier, batch = train_speed.pick_config(b, cuda)
        net, model, opt, ema, node = train_speed.build(cfg, classifier, device, b)
        step = train_speed.make_step(cfg, classifier, net, model, opt, ema, node, batch, device, b)
        return step, torch.cuda.synchronize if cuda else (lambda: None), f"a training step of {path}, batch {batch}"
    b = sample_speed.parse_args(args.bench_args)
    w = sample_speed.workloads(b)
    what = f"{w.preset}, batch {w.batch}, precision {b.precision}, compile {b.compile}, channels_last {b.channels_last}"
    if args.work == "decode":
        if w.decode is None:
            raise SystemExit(f"error: --preset {w.preset} is a pixel model: only a latent preset (dit-xl-2) decodes")
        return w.decode, w.sync, f"the VAE decode of {what}"
    if args.work == "run":
        if not b.run:
            raise SystemExit("error: `run` profiles the benchmark's --run SAMPLER:STEPS: give one after --")
        return (lambda: w.run(b.run[0])), w.sync, f"a whole guided {b.run[0]} run of {what}"
    return w.steps[args.work], w.sync, f"one {args.work} reverse step of {what}"


def main(argv=None):
    args = parse_args(argv)
    fn, sync, what = workload(args)
    for _ in range(args.warmup):
        fn()
    sync()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(args.repeats):
            fn()
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"profile of {what}, {args.repeats} calls after {args.warmup} warm-up, "
          f"{'CUDA kernels' if cuda else 'CPU operators'} by self time:")
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace} (open in https://ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
