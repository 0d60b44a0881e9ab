"""The embedded default data set: scikit-learn's `load_digits`.

1,797 greyscale 8x8 images of the digits 0-9 (values 0..16) that ship inside
scikit-learn, so nothing is downloaded.  They are upsampled to `image_size`
with torch's interpolate (bilinear by default, align_corners=False, clamped),
scaled to [-1, 1] and repeated to 3 equal channels unless channels=1.

Split: 297 images are held out, stratified by digit, by scikit-learn's
train_test_split with random_state=0 (legacy RandomState, so stable across
versions); "train" is the other 1,500.  Both are kept in sorted index order.
The label map's keys and names are "0".."9".
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from guided.data.labels import LabelMap, select_classes
from guided.errors import GuidedError

HELDOUT_SIZE = 297
SPLIT_SEED = 0


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 8 x 8 in 0..16, labels N) of the "train" or "heldout" split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "heldout"):
        raise GuidedError(f"data.split must be 'train' or 'heldout', not {split!r}")
    d = load_digits()
    train, held = train_test_split(np.arange(len(d.target)), test_size=HELDOUT_SIZE,
                                   stratify=d.target, random_state=SPLIT_SEED)
    pick = np.sort(train if split == "train" else held)
    return d.images[pick], d.target[pick]


class DigitsDataset(Dataset):
    """Items are (float32 tensor C x S x S in [-1, 1], int label); held in memory.

    An index may be a pair (index, seed) so the flip is replayable (see folder.py).
    random_flip defaults to False: a mirrored digit is not the same digit.
    """

    in_memory = True
    skipped = 0
    skipped_files: list = []

    def __init__(self, image_size: int = 16, *, split: str = "train", channels: int = 3, classes=None,
                 random_flip: bool = False, interpolation: str = "bilinear"):
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise GuidedError(f"digits interpolation must be bilinear, bicubic or nearest, not {interpolation!r}")
        images, labels = digits_split(split)
        keys = select_classes([str(d) for d in range(10)], classes, "the digits data set")
        keep = np.isin(labels, [int(k) for k in keys])
        remap = {int(k): i for i, k in enumerate(keys)}
        x = torch.from_numpy(images[keep]).float()[:, None] / 16.0
        kw = {} if interpolation == "nearest" else {"align_corners": False}
        x = F.interpolate(x, size=(image_size, image_size), mode=interpolation, **kw).clamp(0, 1)
        self.images = (x * 2 - 1).repeat(1, channels, 1, 1).contiguous()
        self.labels = [remap[int(y)] for y in labels[keep]]
        self.label_map = LabelMap(tuple(keys), tuple(keys))
        self.image_size, self.channels, self.split = image_size, channels, split
        self.random_flip = random_flip

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        rng = random if seed is None else random.Random(int(seed))
        img = self.images[int(index)]
        if self.random_flip and rng.random() < 0.5:
            img = img.flip(-1)
        return img, self.labels[int(index)]
