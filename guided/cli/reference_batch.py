"""Reference batches in the paper's layout, from an image folder or the digits set.

    python -m guided.cli.reference_batch DATA --image-size N --num-samples K --out REF.npz
        [--channels 3|1] [--classes ...] [--seed 0] [--features auto|inception|dinov2|digits|none]

DATA is an ImageNet-layout folder (root/<wnid>/*.JPEG), a flat folder whose class is the
file-name prefix (root/<class>_*.png), or `digits` (scikit-learn's digits, training split).
The batch is class-balanced (K // C images of each of the C classes), drawn with --seed
and preprocessed as for training (guided.evaluation.reference_batch); `arr_0` holds the
uint8 images, `arr_1` their labels, and the statistics in --features' space are cached
beside it (REF.<features>.stats.npz, as guided.cli.evaluate caches them).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from guided.cli import Parser, run_cli
from guided.cli.evaluation_options import add_feature_options
from guided.errors import GuidedError
from guided.evaluation.features import FEATURES, find_inception_weights
from guided.evaluation.reference_batch import make_reference


def build_parser() -> Parser:
    p = Parser(prog="python -m guided.cli.reference_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an image folder (ImageNet layout or flat <class>_*.png), or 'digits'")
    p.add_argument("--image-size", type=int, required=True, help="output height = width, e.g. 64, 256, 16")
    p.add_argument("--num-samples", type=int, default=10_000, help="images in the batch (default: 10,000, "
                   "as the paper's reference batches)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 (RGB) or 1 (grey) (default: 3)")
    p.add_argument("--classes", default=None, help="a class subset: a count K (the first K) or a comma list")
    p.add_argument("--layout", choices=("auto", "imagenet", "folder"), default="auto", help="folder layout")
    p.add_argument("--seed", type=int, default=0, help="which images are drawn (default: 0)")
    add_feature_options(p, default="auto", choices=("auto", *FEATURES, "none"), batch_size=False,
                        features_help="cache the reference statistics in this feature space (auto: digits for "
                                      "the digits set, else inception where its weights are found, else none; "
                                      "none: skip)")
    p.add_argument("--device", default=None, help="torch device for the feature network")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _classes(text):
    if text is None:
        return None
    return int(text) if text.isdigit() else [c.strip() for c in text.split(",") if c.strip()]


def _run(args) -> int:
    data, out = Path(args.data), Path(args.out)
    if args.data != "digits" and not data.is_dir():
        raise GuidedError(f"DATA {data} " + ("is a file, not a folder of images" if data.exists() else
                                             "does not exist") + "; give an image folder or 'digits'")
    if out.is_dir():
        raise GuidedError(f"--out {out} is a folder; give the .npz file to write")
    if args.features == "auto" and args.data != "digits":  # the statistics are a cache: skip it without weights
        try:
            find_inception_weights(args.inception_weights)
        except GuidedError as e:
            print(f"note: the batch is written without cached statistics ({e}); guided.cli.evaluate computes "
                  "them when it has the weights", file=sys.stderr)
            args.features = "none"
    out, images, labels, features = make_reference(
        args.data, args.image_size, args.num_samples, args.out, channels=args.channels,
        classes=_classes(args.classes), seed=args.seed, layout=args.layout, features=args.features,
        inception_weights=args.inception_weights, dinov2_weights=args.dinov2_weights, device=args.device,
        overwrite=args.overwrite)
    per_class = np.bincount(labels)
    print(f"wrote {out}: {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, "
          f"{len(per_class)} classes, {per_class.min()}-{per_class.max()} per class"
          + (f"; {features} statistics cached beside it" if features is not None else ""))
    return 0


def main(argv=None) -> int:
    return run_cli(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
