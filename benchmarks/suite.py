"""Every row of the README's performance table, with the standard switches and with the fastest
settings, printed as one Markdown table. Run through benchmarks/gpu_suite.sh:

    bash benchmarks/gpu_suite.sh              # one GPU: the whole table, within --budget seconds
    bash benchmarks/gpu_suite.sh --dry-run    # anywhere: tiny stand-ins, one step each (tests/test_speed.py)

The rows reuse train_speed.measure and sample_speed.measure in this one process (imports and CUDA
start once); the compiled graphs and caches of a row are dropped before the next, so each peak
memory is its own. A cell that fails (out of memory, a compiler error) says so and the table goes
on; a row that would start past the budget is left out and named.
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
from pathlib import Path
from time import perf_counter as clock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sample_speed  # noqa: E402
import train_speed  # noqa: E402

# standard: every speed switch off, the trainer's and sampler's defaults (fp32, eager, NCHW; fused AdamW
# on CUDA as the trainer has it). fastest: the switches that help on a GPU (guided/speed.py).
SETTINGS = {"standard": dict(precision="no", compile=False, channels_last=False),
            "fastest": dict(precision="bf16", compile=True, channels_last=True)}
# (what, benchmark, its arguments, [(figure, format, how to read it from the benchmark's dict)])
ROWS = [
    ("ImageNet-64 training, batch 64", train_speed, ["--config", "configs/imagenet64.yaml", "--batch-size", "64"],
     [("images/s", ".1f", lambda r: r["images_per_s"]), ("peak GiB", ".2f", lambda r: r["peak_gib"])]),
    ("ImageNet-256 training, batch 16", train_speed, ["--config", "configs/imagenet256.yaml", "--batch-size", "16"],
     [("images/s", ".1f", lambda r: r["images_per_s"]), ("peak GiB", ".2f", lambda r: r["peak_gib"])]),
    ("digits training, batch 64", train_speed, ["--config", "configs/digits.yaml", "--batch-size", "64"],
     [("steps/s", ".1f", lambda r: 1 / r["seconds"])]),
    ("ImageNet-64 reverse step, batch 64", sample_speed, ["--preset", "64x64", "--batch-size", "64", "--loop", "250"],
     [("unguided ms", ".1f", lambda r: r["unguided_ms"]), ("guided ms", ".1f", lambda r: r["guided_ms"]),
      ("250-step guided run, images/s", ".2f", lambda r: r["loop_images_per_s"])]),
    ("ImageNet-256 reverse step, batch 16", sample_speed, ["--preset", "256x256", "--batch-size", "16"],
     [("unguided ms", ".1f", lambda r: r["unguided_ms"]), ("guided ms", ".1f", lambda r: r["guided_ms"])]),
]
# --dry-run: the digits networks, batch 2, one step, a 3-step "whole run", no compiler (minutes on a CPU)
DRY = {train_speed: ["--config", "configs/digits.yaml", "--batch-size", "2", "--steps", "1", "--warmup", "1"],
       sample_speed: ["--preset", "digits", "--batch-size", "2", "--steps", "1", "--warmup", "1"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny stand-ins on any device: checks the script, "
                   "not the speed")
    p.add_argument("--budget", type=float, default=450, help="seconds; rows that would start later are left out")
    p.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    return p.parse_args(argv)


def bench_args(bench, row_args: list[str], setting: dict, args) -> argparse.Namespace:
    """The benchmark's own arguments for one cell."""
    argv = list(DRY[bench]) if args.dry_run else [*row_args, "--steps", str(args.steps), "--warmup", "3"]
    if args.dry_run and "--loop" in row_args:
        argv += ["--loop", "3"]
    argv += ["--precision", setting["precision"]]
    argv += ["--compile"] if setting["compile"] and not args.dry_run else []
    argv += ["--channels-last"] if setting["channels_last"] else []
    return bench.parse_args(argv)


def run_cell(bench, row_args, setting, args) -> dict | str:
    """The benchmark's figures, or one line saying why there are none."""
    try:
        return bench.measure(bench_args(bench, row_args, setting, args), count_flops=False)
    except Exception as e:  # one failed cell (out of memory, a compiler error) must not lose the table
        return f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:120]
    finally:
        torch._dynamo.reset()  # drop compiled graphs (and the parameters they hold) before the next cell
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(results: dict, left_out: list[str]) -> list[str]:
    lines = [f"| figure | {' | '.join(SETTINGS)} |", "| --- |" + " --- |" * len(SETTINGS)]
    for what, _, _, figures in ROWS:
        if what not in results:
            continue
        for name, spec, read in figures:
            cells = [r if isinstance(r, str) else format(read(r), spec) for r in results[what].values()]
            lines.append(f"| {what}: {name} | {' | '.join(cells)} |")
    return lines + [f"| {what}: left out (time budget) | | |" for what in left_out]


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("error: no CUDA device here; --dry-run runs the tiny stand-ins on the CPU", file=sys.stderr)
        return 2
    start, results, left_out = clock(), {}, []
    for what, bench, row_args, _ in ROWS:
        if clock() - start > args.budget:
            left_out.append(what)
            continue
        results[what] = {name: run_cell(bench, row_args, setting, args) for name, setting in SETTINGS.items()}
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(("DRY RUN (tiny digits stand-ins, one step: the figures mean nothing); " if args.dry_run else "")
          + f"device {device}, torch {torch.__version__}, {clock() - start:.0f} s")
    print("standard: " + ", ".join(f"{k}={v}" for k, v in SETTINGS["standard"].items())
          + "; fastest: " + ", ".join(f"{k}={v}" for k, v in SETTINGS["fastest"].items())
          + (" (compile off in a dry run)" if args.dry_run else ""))
    print("\n".join(table(results, left_out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
