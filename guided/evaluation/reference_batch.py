"""Reference batches in the paper's layout, from an image folder or the digits set.

`build_reference` draws a class-balanced batch of a data set's training images: DATA is an
ImageNet-layout folder (root/<wnid>/*.JPEG), a flat folder whose class is the file-name
prefix (root/<class>_*.png), or `digits` (scikit-learn's digits, training split). Images
get the training data's preprocessing (guided.data: the reference's centre crop, or the
digits' bilinear upsampling) without augmentation. K // C images of each of the C classes
(one more for K mod C classes picked at random) are drawn at random without replacement
with the seed; unreadable images are skipped and replaced by others of their class.

`write_reference` writes what the paper's published batches hold for the evaluator:
`arr_0`, uint8 K x N x N x C, and here also `arr_1`, the int64 labels (indices into the
sorted class keys, as the trainers number them). The published ones also carry Inception
statistics over the whole training set (mu, sigma, mu_s, sigma_s); these statistics are
over the batch itself and cached beside it (REF.<features>.stats.npz, as
guided.evaluation.evaluate caches them), which is what the paper's evaluator computes for a
batch without them. `make_reference` does both; the command line is guided.cli.reference_batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from guided.data import build_dataset
from guided.errors import GuidedError
from guided.evaluation.evaluate import NpzImages, reference_features, write_npz
from guided.evaluation.features import get_extractor


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


def default_features(data: str) -> str:
    """The feature space a reference batch of `data` is cached in when none is named."""
    return "digits" if data == "digits" else "inception"


def make_reference(data: str, image_size: int, num_samples: int, out, *, channels: int = 3, classes=None,
                   seed: int = 0, layout: str = "auto", features: str | None = "auto", inception_weights=None,
                   dinov2_weights=None, device=None, overwrite: bool = False, progress: bool = True):
    """Build a class-balanced reference batch of `data`, write it to `out` and cache its statistics
    in `features` ("auto": `default_features`; None or "none": no statistics).

    Bad sizes, an existing `out` and missing weights are refused before any image is read.
    Returns (path written, images, labels, the extractor's name or None).
    """
    if image_size < 1:
        raise GuidedError(f"--image-size must be a positive integer, not {image_size}")
    if Path(out).exists() and not overwrite:  # before minutes of decoding
        raise GuidedError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    features = default_features(data) if features == "auto" else features
    extractor = None if features in (None, "none") else get_extractor(
        features, image_size, inception_weights, device, dinov2_weights)  # missing weights: now
    images, labels = build_reference(data, image_size, num_samples, channels=channels, classes=classes, seed=seed,
                                     layout=layout, progress=progress)
    path = write_reference(Path(out), images, labels, overwrite=overwrite, extractor=extractor, progress=progress)
    return path, images, labels, (extractor.name if extractor is not None else None)
