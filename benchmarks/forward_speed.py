"""Forward passes of a config's U-Net: a figure for timing two checkouts against each other.

    python benchmarks/forward_speed.py --threads 1                 # ImageNet-64 architecture at 64 channels, batch 4
    python benchmarks/forward_speed.py --threads 1 --code ../old   # the same through another checkout's guided/

Random weights (speed does not depend on them), eval mode, no gradients: what a sampling step
spends in the score model. Alternate the two commands as whole processes (A B A B ...) and compare
medians; `--code` makes the comparison use one script for both sides.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "imagenet64.yaml"))
    p.add_argument("--channels", type=int, default=64, help="model.model_channels (default 64: the ImageNet-64 "
                   "layout at a size a CPU can time)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--passes", type=int, default=3, help="timed forward passes, after one untimed")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--code", default=str(REPO), help="the checkout whose guided/ package to time")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    from guided.config import load_config
    from guided.networks.unet import UNetModel

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.model_channels={args.channels}"]).model
    torch.manual_seed(0)
    net = UNetModel(cfg).eval()
    n = args.batch_size
    x, t = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size), torch.randint(0, 1000, (n,))
    kw = {"y": torch.randint(0, cfg.num_classes, (n,))} if cfg.num_classes is not None else {}
    with torch.no_grad():
        net(x, t, **kw)
        t0 = time.perf_counter()
        for _ in range(args.passes):
            net(x, t, **kw)
    ms = (time.perf_counter() - t0) / args.passes * 1000
    print(f"{Path(args.config).name} at {args.channels} channels, batch {n}, {torch.get_num_threads()} thread(s), "
          f"guided/ of {args.code}: {ms:.1f} ms per forward pass")


if __name__ == "__main__":
    main()
