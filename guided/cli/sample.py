"""sample_guided.py: class-conditional samples with classifier guidance.

    python sample_guided.py --class 3 --scale 4 --num-samples 100 --out out/
    python sample_guided.py --model uncond --class 7 --scales 0,1,2,4,10 --out sweep/
    python sample_guided.py --model 256x256_diffusion.pt --classifier 256x256_classifier.pt --class 207 --scale 1

With no --model, the digits models shipped in guided/assets/digits are used. The nine released
ADM checkpoints are built from their published flags by file name; other ADM checkpoints take
--adm-flags / --classifier-flags.
Runs under `accelerate launch` too: each process draws its share of batches.
"""
from __future__ import annotations

import sys
from pathlib import Path

from guided.cli import Parser, run_cli
from guided.cli.options import (_number, _scales, add_guidance_args, add_model_args, add_sampler_args, guide_settings,
                                options, pipeline_keywords)
from guided.generation import generate, load_pipeline
from guided.generation.loading import parse_classes, sdedit_request
from guided.generation.resolve import resolve
from guided.generation.runtime import processes


def build_parser() -> Parser:
    p = Parser(prog="sample_guided.py", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    g = add_guidance_args(p)
    g.add_argument("--scales", type=_scales, default=None, help="a sweep, e.g. 0,1,2,4,10: one folder per scale")
    add_sampler_args(p)
    e = p.add_argument_group("SDEdit")
    e.add_argument("--init-image", default=None, help="a guide image to perturb and denoise")
    e.add_argument("--t0", type=_number(float), default=0.5, help="how far to perturb, in (0, 1]")
    e.add_argument("--mask", default=None, help="a mask image, white where the picture may change")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="out", help="output folder (samples.npz, grid.png, settings.json)")
    o.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    o.add_argument("--png", action="store_true", help="also write one PNG per sample")
    o.add_argument("--grid", type=_number(int, 0), default=10,
                   help="samples per class shown in grid.png, each class on its own rows (0: no grid.png)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_main, args)


def _main(args) -> int:
    scales = args.scales or [args.scale]
    for scale in scales:
        options(args, scale)  # contradictory sampler options are refused before any loading
    device, rank, world, barrier = processes(args.device)
    if rank == 0:
        print(f"sampling on {world} process{'es' if world > 1 else ''}, device {device}", flush=True)
    pipeline = load_pipeline(**pipeline_keywords(args, device))
    classes = parse_classes(args.classes, pipeline)
    init = sdedit_request(pipeline, args.init_image, args.t0, args.mask)
    say = (lambda line: print(line, file=sys.stderr)) if rank == 0 else None
    runs = [resolve(pipeline, options(args, scale), editing=init is not None, say=say if i == 0 else None)
            for i, scale in enumerate(scales)]  # the policy, once
    used = guide_settings(args, pipeline, max(runs, key=lambda o: o.scale))
    settings = {"model": args.model, "device": device, **used, "scheduler": args.scheduler,
                "init_image": args.init_image, "t0": args.t0 if args.init_image else None, "mask": args.mask}
    for scale, opts in zip(scales, runs):
        out = Path(args.out) / f"scale_{scale:g}" if args.scales else Path(args.out)
        path = generate(pipeline, out, classes=classes, num_samples=args.num_samples, batch_size=args.batch_size,
                        seed=args.seed, opts=opts, device=device, overwrite=args.overwrite,
                        save_pngs=args.png, init=init, rank=rank, world_size=world, barrier=barrier,
                        settings=settings, grid=args.grid, class_sampling=args.class_sampling)
        if rank == 0:
            written = [path, *[path.parent / f for f, on in (("grid.png", args.grid), ("images/", args.png)) if on],
                       path.parent / "settings.json"]
            print(f"wrote {', '.join(map(str, written))}" + (f" (scale {scale:g})" if args.scales else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
