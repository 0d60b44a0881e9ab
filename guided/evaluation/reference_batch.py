"""Reference batches in the paper's layout, from an image folder or the digits set.

    python -m guided.evaluation.reference_batch DATA --image-size N --num-samples K --out REF.npz
        [--channels 3|1] [--classes ...] [--seed 0] [--features auto|inception|dinov2|digits|none]

DATA is an ImageNet-layout folder (root/<wnid>/*.JPEG), a flat folder whose class is the
file-name prefix (root/<class>_*.png), or `digits` (scikit-learn's digits, training split).
Images get the training data's preprocessing (guided.data: the reference's centre crop,
or the digits' bilinear upsampling) without augmentation. The batch is class-balanced:
K // C images of each of the C classes (one more for K mod C classes picked at random),
drawn at random without replacement with --seed. Unreadable images are skipped and
replaced by others of their class.

The file holds what the paper's published batches hold for the evaluator: `arr_0`, uint8
K x N x N x C, and here also `arr_1`, the int64 labels (indices into the sorted class keys,
as the trainers number them). The published ones also carry Inception statistics over the
whole training set (mu, sigma, mu_s, sigma_s); these statistics are over the batch itself and
cached beside it (REF.<features>.stats.npz, as guided.evaluation.evaluate caches them), which is what the
paper's evaluator computes for a batch without them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from guided.data import build_dataset
from guided.errors import GuidedError
from guided.evaluation.evaluate import NpzImages, reference_features, write_npz
from guided.evaluation.features import FEATURES, get_extractor


def balanced_plan(labels, num_samples: int, seed: int = 0) -> list[tuple[int, np.ndarray, int]]:
    """Per class: (label, its indices in a random order, how many to take)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    quota = np.full(len(classes), num_samples // len(classes))
    quota[rng.permutation(len(classes))[: num_samples % len(classes)]] += 1
    counts = np.array([(labels == c).sum() for c in classes])
    if (counts < quota).any():
        c = int(np.argmax(quota - counts))
        raise GuidedError(f"class {classes[c]} has only {counts[c]} images, too few for a class-balanced batch of "
                          f"{num_samples} ({quota[c]} per class); ask for at most {len(classes) * counts.min()} "
                          f"(--num-samples)")
    return [(int(c), rng.permutation(np.flatnonzero(labels == c)), int(q)) for c, q in zip(classes, quota)]


def item_uint8(item) -> np.ndarray:
    """A dataset item (float C x H x W in [-1, 1]) as the uint8 H x W x C it was made from."""
    return ((item.numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0)


def build_reference(data: str, image_size: int, num_samples: int, *, channels: int = 3, classes=None,
                    seed: int = 0, layout: str = "auto", progress: bool = True):
    """(images uint8 K x N x N x C, labels int64 K): a class-balanced batch of `data`'s training images."""
    if num_samples < 1:
        raise GuidedError(f"--num-samples must be at least 1, not {num_samples}")
    cfg = {"kind": "digits"} if data == "digits" else {"kind": layout, "root": data}
    dataset = build_dataset({**cfg, "image_size": image_size, "channels": channels, "classes": classes,
                             "random_flip": False, "random_crop": False})
    images, labels = [], []
    bar = tqdm(total=num_samples, desc="reference images", unit="img", disable=not progress)
    for label, order, quota in balanced_plan(dataset.labels, num_samples, seed):
        taken = 0
        for i in order:
            if taken == quota:
                break
            skipped = dataset.skipped
            image, _ = dataset[int(i)]
            if dataset.skipped > skipped:  # unreadable: the dataset handed over a neighbour instead
                continue
            images.append(item_uint8(image))
            labels.append(label)
            taken += 1
            bar.update(1)
        if taken < quota:
            raise GuidedError(f"class {dataset.label_map.key(label)} has only {taken} readable images, too few "
                              f"for {quota} per class; ask for fewer (--num-samples)")
    bar.close()
    order = np.random.default_rng(seed).permutation(len(images))  # classes interleaved, as a random draw
    return np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]


def write_reference(out: Path, images, labels, *, overwrite=False, extractor=None, progress=True) -> Path:
    """Write the batch atomically, then its statistics in `extractor`'s feature space beside it."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise GuidedError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    write_npz(out, images, labels)
    if extractor is not None:
        reference_features(NpzImages(out), extractor, progress=progress)
    return out


def _parser():
    from guided.cli import Parser

    p = Parser(prog="python -m guided.evaluation.reference_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="an image folder (ImageNet layout or flat <class>_*.png), or 'digits'")
    p.add_argument("--image-size", type=int, required=True, help="output height = width, e.g. 64, 256, 16")
    p.add_argument("--num-samples", type=int, default=10_000, help="images in the batch (default: 10,000, "
                   "as the paper's reference batches)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="3 (RGB) or 1 (grey) (default: 3)")
    p.add_argument("--classes", default=None, help="a class subset: a count K (the first K) or a comma list")
    p.add_argument("--layout", choices=("auto", "imagenet", "folder"), default="auto", help="folder layout")
    p.add_argument("--seed", type=int, default=0, help="which images are drawn (default: 0)")
    p.add_argument("--features", choices=("auto", *FEATURES, "none"), default="auto",
                   help="cache the reference statistics in this feature space (auto: digits for the digits set, "
                        "else inception; none: skip)")
    p.add_argument("--inception-weights", metavar="PATH", help="see python -m guided.evaluation.evaluate --help")
    p.add_argument("--dinov2-weights", metavar="PATH", help="see python -m guided.evaluation.evaluate --help")
    p.add_argument("--device", default=None, help="torch device for the feature network")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _classes(text):
    if text is None:
        return None
    return int(text) if text.isdigit() else [c.strip() for c in text.split(",") if c.strip()]


def _run(args) -> int:
    if args.image_size < 1:
        raise GuidedError(f"--image-size must be a positive integer, not {args.image_size}")
    if Path(args.out).exists() and not args.overwrite:  # before minutes of decoding
        raise GuidedError(f"{args.out} already exists; pass --overwrite to replace it or choose another --out")
    features = ("digits" if args.data == "digits" else "inception") if args.features == "auto" else args.features
    extractor = None if features == "none" else get_extractor(
        features, args.image_size, args.inception_weights, args.device, args.dinov2_weights)  # missing weights: now
    images, labels = build_reference(args.data, args.image_size, args.num_samples, channels=args.channels,
                                     classes=_classes(args.classes), seed=args.seed, layout=args.layout)
    out = write_reference(Path(args.out), images, labels, overwrite=args.overwrite, extractor=extractor)
    per_class = np.bincount(labels)
    print(f"wrote {out}: {len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, "
          f"{len(per_class)} classes, {per_class.min()}-{per_class.max()} per class"
          + (f"; {extractor.name} statistics cached beside it" if extractor is not None else ""))
    return 0


def main(argv=None) -> int:
    from guided.cli import run_cli

    return run_cli(_run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
