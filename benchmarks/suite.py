"""Every row of the README's performance table, with the standard switches and with the fastest
settings, printed as one Markdown table. Run through benchmarks/gpu_suite.sh:

    bash benchmarks/gpu_suite.sh              # one GPU: the whole table, within --budget seconds
    bash benchmarks/gpu_suite.sh --dry-run    # anywhere: tiny stand-ins, one step each (tests/test_speed.py)
    bash benchmarks/gpu_suite.sh --json suite.json          # on the GPU: also every figure as JSON
    python benchmarks/suite.py --from-json suite.json --page docs/project/performance.md   # back here

The ImageNet-64 row also times whole guided runs of the batch (DDPM 250 and the few-step default) and
the DiT-XL/2 row a latent model's step, its VAE decode and a whole run; each table line gives the
paper's code's figure on an H100 where there is one (154 images/s training at batch 64 in 24.6 GiB, a
240 ms guided step at batch 64), and the fastest setting over it.

The rows reuse train_speed.measure and sample_speed.measure in this one process (imports and CUDA
start once); the compiled graphs and caches of a row are dropped before the next, so each peak
memory is its own. A cell that fails (out of memory, a compiler error) says so and the table goes
on; a row that would start past the budget is left out and named.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
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
FEW_STEP = "dpm++2m-sde:karras20"  # the few-step default (DPM-Solver++(2M) SDE on 20 Karras levels)
TINY_TRAIN = ["--config", "configs/digits.yaml", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
TINY_SAMPLE = ["--batch-size", "2", "--steps", "1", "--warmup", "1"]
# (what, benchmark, its arguments, its --dry-run arguments (tiny stand-ins, one step),
#  [(figure, format, how to read it from the benchmark's dict, the paper's code on an H100 or None)]),
# most wanted first: the budget leaves out the last rows.
ROWS = [
    ("ImageNet-64 training, batch 64", train_speed, ["--config", "configs/imagenet64.yaml", "--batch-size", "64"],
     TINY_TRAIN, [("images/s", ".1f", lambda r: r["images_per_s"], 154.0),
                  ("peak GiB", ".2f", lambda r: r["peak_gib"], 24.6)]),
    ("ImageNet-64 reverse step, batch 64", sample_speed,
     ["--preset", "64x64", "--batch-size", "64", "--run", "ddpm:250", "--run", FEW_STEP],
     ["--preset", "digits", *TINY_SAMPLE, "--run", "ddpm:3", "--run", "dpm++2m-sde:karras3"],
     [("unguided ms", ".1f", lambda r: r["unguided_ms"], None), ("guided ms", ".1f", lambda r: r["guided_ms"], 240.0),
      ("250-step guided DDPM run, images/s", ".2f", lambda r: r["run_images_per_s"][0], None),
      ("few-step default guided run (dpm++2m-sde, karras20), images/s", ".2f", lambda r: r["run_images_per_s"][1],
       None)]),
    ("DiT-XL/2 latent 256 (SD VAE, latent classifier), batch 16", sample_speed,
     ["--preset", "dit-xl-2", "--batch-size", "16", "--run", FEW_STEP],
     ["--preset", "dit-tiny", *TINY_SAMPLE, "--run", "dpm++2m-sde:karras3"],
     [("unguided ms", ".1f", lambda r: r["unguided_ms"], None), ("guided ms", ".1f", lambda r: r["guided_ms"], None),
      ("VAE decode of the batch, ms", ".1f", lambda r: r["decode_ms"], None),
      ("few-step default guided run with the decode, images/s", ".2f", lambda r: r["run_images_per_s"][0], None)]),
    ("ImageNet-256 reverse step, batch 16", sample_speed, ["--preset", "256x256", "--batch-size", "16"],
     ["--preset", "digits", *TINY_SAMPLE],
     [("unguided ms", ".1f", lambda r: r["unguided_ms"], None), ("guided ms", ".1f", lambda r: r["guided_ms"], None)]),
    ("ImageNet-256 training, batch 16", train_speed, ["--config", "configs/imagenet256.yaml", "--batch-size", "16"],
     TINY_TRAIN, [("images/s", ".1f", lambda r: r["images_per_s"], None),
                  ("peak GiB", ".2f", lambda r: r["peak_gib"], None)]),
    ("digits training, batch 64", train_speed, ["--config", "configs/digits.yaml", "--batch-size", "64"],
     TINY_TRAIN, [("steps/s", ".1f", lambda r: 1 / r["seconds"], None)]),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny stand-ins on any device: checks the script, "
                   "not the speed")
    p.add_argument("--budget", type=float, default=450, help="seconds; rows that would start later are left out")
    p.add_argument("--steps", type=int, default=10, help="timed steps per figure")
    p.add_argument("--json", metavar="FILE", help="also write every figure, the device and the command to FILE")
    p.add_argument("--from-json", metavar="FILE", help="measure nothing: the table of a --json FILE written before")
    p.add_argument("--page", metavar="MD", help=f"write the table into MD between its {BEGIN!r} and {END!r} lines")
    return p.parse_args(argv)


def bench_args(bench, row_args: list[str], dry_args: list[str], setting: dict, args) -> argparse.Namespace:
    """The benchmark's own arguments for one cell."""
    argv = list(dry_args) if args.dry_run else [*row_args, "--steps", str(args.steps), "--warmup", "3"]
    argv += ["--precision", setting["precision"]]
    argv += ["--compile"] if setting["compile"] and not args.dry_run else []
    argv += ["--channels-last"] if setting["channels_last"] else []
    return bench.parse_args(argv)


def run_cell(bench, row_args, dry_args, setting, args) -> dict | str:
    """The benchmark's figures, or one line saying why there are none."""
    try:
        return bench.measure(bench_args(bench, row_args, dry_args, setting, args), count_flops=False)
    except Exception as e:  # one failed cell (out of memory, a compiler error) must not lose the table
        return f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:120]
    finally:
        torch._dynamo.reset()  # drop compiled graphs (and the parameters they hold) before the next cell
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cell(result, read, spec: str) -> str:
    if isinstance(result, str):
        return result
    try:
        return format(read(result), spec)
    except (KeyError, IndexError, TypeError) as e:  # a figure this cell did not give
        return f"error: no figure ({type(e).__name__})"


def table(results: dict, left_out: list[str]) -> list[str]:
    """The Markdown table: each figure with both settings, the paper's code where the issue gives it, and
    the fastest setting's figure over the paper's (images/s: above 1 is faster; ms and GiB: below 1 is better)."""
    lines = [f"| figure | {' | '.join(SETTINGS)} | paper's code (H100) | fastest / paper |",
             "| --- |" + " --- |" * (len(SETTINGS) + 2)]
    for what, _, _, _, figures in ROWS:
        if what not in results:
            continue
        for name, spec, read, paper in figures:
            cells = [cell(results[what].get(s, "not run"), read, spec) for s in SETTINGS]
            ratio = ""
            if paper is not None and not cells[-1].startswith("error"):
                ratio = f"{float(cells[-1]) / paper:.2f}"
            lines.append(f"| {what}: {name} | {' | '.join(cells)} | {'' if paper is None else paper} | {ratio} |")
    return lines + [f"| {what}: left out (time budget) | |" + " |" * (len(SETTINGS) + 1) for what in left_out]


def measure_all(args) -> dict:
    """Every row within the budget: {results, left_out, device, torch, seconds, dry_run, settings}."""
    cuda = torch.cuda.is_available()
    start, results, left_out = clock(), {}, []
    for what, bench, row_args, dry_args, _ in ROWS:
        if clock() - start > args.budget:
            left_out.append(what)
            continue
        results[what] = {name: run_cell(bench, row_args, dry_args, setting, args) for name, setting in SETTINGS.items()}
        print(f"[{clock() - start:.0f} s] {what}: done", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    return dict(results=results, left_out=left_out, device=device, torch=torch.__version__,
                seconds=round(clock() - start), dry_run=args.dry_run, settings=SETTINGS,
                command="python benchmarks/suite.py " + " ".join(sys.argv[1:]), date=time.strftime("%Y-%m-%d"))


def header(run: dict) -> list[str]:
    s = SETTINGS
    return [("DRY RUN (tiny stand-ins, one step: the figures mean nothing); " if run["dry_run"] else "")
            + f"device {run['device']}, torch {run['torch']}, {run['seconds']} s, {run['date']}: `{run['command']}`",
            "standard: " + ", ".join(f"{k}={v}" for k, v in s["standard"].items())
            + "; fastest: " + ", ".join(f"{k}={v}" for k, v in s["fastest"].items())
            + (" (compile off in a dry run)" if run["dry_run"] else "")]


BEGIN, END = "<!-- benchmarks/suite.py --page: the table -->", "<!-- benchmarks/suite.py --page: end -->"


def write_page(path: Path, lines: list[str]) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} has no {BEGIN!r} ... {END!r} lines to write the table between")
    head, rest = text.split(BEGIN, 1)
    path.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.split(END, 1)[1])


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        run = json.loads(Path(args.from_json).read_text())
    elif not torch.cuda.is_available() and not args.dry_run:
        print("error: no CUDA device here; --dry-run runs the tiny stand-ins on the CPU", file=sys.stderr)
        return 2
    else:
        run = measure_all(args)
        if args.json:
            Path(args.json).write_text(json.dumps(run, indent=1, default=str))
    lines = header(run) + [""] + table(run["results"], run["left_out"])
    print("\n".join(lines))
    if args.page:
        write_page(Path(args.page), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
