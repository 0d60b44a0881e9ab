"""Image-folder datasets: ImageNet's layout and the reference's flat layout.

Layouts
  "imagenet": root/<wnid>/**/*.JPEG -- the class is the top-level folder name.
  "flat":     root/**/<class>_<anything>.png -- the class is the file-name
              prefix before the first underscore, as the reference trainer
              reads it (image_datasets.py: `bf.basename(path).split("_")[0]`).
  "auto":     "imagenet" when a sub-folder of root holds images, else "flat".
Class keys are sorted and numbered 0..K-1 (the reference's
`sorted(set(class_names))`), after choosing a subset with `classes`.

Each item is (float32 tensor C x H x W in [-1, 1], int label).  An index may
also be a pair (index, seed): the crop and flip then draw from
random.Random(seed), which is how `infinite_batches` makes augmentation
replayable; a plain index draws from the global `random` module, as the
reference does.

Unreadable files never crash the loader.  Zero-byte files are dropped when
the dataset is built; with `in_memory` every file is decoded then and the
unreadable ones are dropped too.  Otherwise a file that fails to decode
while training is replaced by the next readable index, a warning names it,
and it is marked bad in memory shared with the DataLoader workers, so
`skipped` / `skipped_files` count each unreadable file once.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from guided.data.images import (BadImage, box_halve, center_crop_arr, is_image_name, list_image_files,
                                load_rgb, random_crop_arr, random_crop_sizes, warn_skipped)
from guided.data.labels import LabelMap, select_classes
from guided.errors import GuidedError

IN_MEMORY_MAX_IMAGES = 20_000
IN_MEMORY_MAX_BYTES = 2 << 30


def _has_image(folder: str) -> bool:
    return any(is_image_name(f) for _, _, files in os.walk(folder) for f in files)


def _subdirs(root: str) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.name)


def detect_layout(root: str) -> str:
    """"imagenet" if some sub-folder of root holds images, else "flat"."""
    return "imagenet" if any(_has_image(d.path) for d in _subdirs(root)) else "flat"


def _imagenet_files(root: str) -> dict[str, list[str]]:
    found = {d.name: list_image_files(d.path) for d in _subdirs(root)}
    loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_name(e.name)]
    if loose:
        warnings.warn(f"ignoring {len(loose)} images directly in {root}: the ImageNet layout "
                      f"reads only class folders root/<wnid>/", stacklevel=3)
    return {k: v for k, v in found.items() if v}


def _flat_files(root: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    unprefixed = []
    for path in list_image_files(root):
        name = os.path.basename(path)
        if "_" not in name:
            unprefixed.append(path)
            continue
        found.setdefault(name.split("_")[0], []).append(path)
    if unprefixed and found:
        warnings.warn(f"ignoring {len(unprefixed)} images in {root} whose names have no "
                      f"'<class>_' prefix, e.g. {unprefixed[0]}", stacklevel=3)
    elif unprefixed:
        raise GuidedError(f"no file in {root} is named '<class>_<anything>' (e.g. {unprefixed[0]}); "
                          f"rename the files or put them in class folders root/<class>/")
    return found


class ImageFolderDataset(Dataset):
    def __init__(self, root, image_size: int, *, layout: str = "auto", classes=None,
                 random_flip: bool = True, random_crop: bool = False, in_memory=None, channels: int = 3):
        root = os.path.expanduser(str(root))
        if not os.path.isdir(root):
            raise GuidedError(f"data folder {root} does not exist or is not a folder; set data.root")
        if layout == "auto":
            layout = detect_layout(root)
        if layout not in ("imagenet", "flat"):
            raise GuidedError(f"unknown layout {layout!r}; use 'imagenet', 'flat' or 'auto'")
        by_class = _imagenet_files(root) if layout == "imagenet" else _flat_files(root)
        if not by_class:
            raise GuidedError(f"no images found in {root} (looked for .jpg, .jpeg, .png, .gif, .webp, "
                              f".bmp, .tif files); check data.root")
        keys = select_classes(sorted(by_class), classes, root)
        self.root, self.layout, self.image_size, self.channels = root, layout, image_size, channels
        self.random_flip, self.random_crop = random_flip, random_crop
        self.label_map = LabelMap.from_keys(keys)
        self.files = [f for label, k in enumerate(keys) for f in by_class[k]]
        self.labels = [label for label, k in enumerate(keys) for _ in by_class[k]]
        self._early_skipped: list[str] = []
        self._drop(lambda i, f: os.path.getsize(f) == 0, "empty file")
        self.in_memory = self._want_memory() if in_memory is None else bool(in_memory)
        self._cache = self._fill_cache() if self.in_memory else None
        if not self.files:
            raise GuidedError(f"none of the images in {root} could be read")
        self._bad = multiprocessing.RawArray("b", len(self.files))  # shared with workers

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped_files(self) -> list[str]:
        """Unreadable files so far: dropped when built, plus those found while loading."""
        late = np.frombuffer(self._bad, dtype=np.int8).nonzero()[0]
        return self._early_skipped + [self.files[i] for i in late]

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def _drop(self, is_bad, why) -> None:
        bad = {i for i, f in enumerate(self.files) if is_bad(i, f)}
        for i in sorted(bad):
            warn_skipped(self.files[i], why if isinstance(why, str) else why[i])
            self._early_skipped.append(self.files[i])
        self.files = [f for i, f in enumerate(self.files) if i not in bad]
        self.labels = [y for i, y in enumerate(self.labels) if i not in bad]

    # ---- decoding and caching -------------------------------------------------
    def _want_memory(self) -> bool:
        side = 2 * random_crop_sizes(self.image_size)[1] if self.random_crop else self.image_size
        n = len(self.files)
        return n <= IN_MEMORY_MAX_IMAGES and n * 4 * side * side <= IN_MEMORY_MAX_BYTES

    def _prepare(self, path: str) -> np.ndarray:
        """Decode a file into what is cached: the centre crop, or, for random
        crops, the image after the BOX halvings every random size would do."""
        img = load_rgb(path)
        if self.random_crop:
            return np.array(box_halve(img, random_crop_sizes(self.image_size)[1]))
        return center_crop_arr(img, self.image_size)

    def _try_prepare(self, path):
        try:
            return self._prepare(path)
        except BadImage as e:
            return str(e)

    def _fill_cache(self):
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            decoded = list(pool.map(self._try_prepare, self.files))
        errors = {i: d for i, d in enumerate(decoded) if isinstance(d, str)}
        self._drop(lambda i, f: i in errors, errors)
        good = [d for d in decoded if not isinstance(d, str)]
        return good if self.random_crop or not good else np.stack(good)

    def _base(self, i: int):
        if self._cache is not None:
            return self._cache[i]
        if self._bad[i]:
            return None
        try:
            return self._prepare(self.files[i])
        except BadImage as e:
            warn_skipped(self.files[i], str(e))
            self._bad[i] = 1
            return None

    # ---- items ----------------------------------------------------------------
    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        rng = random if seed is None else random.Random(int(seed))
        n = len(self.files)
        for k in range(n):  # a lazily found bad file is replaced by the next good one
            j = (int(index) + k) % n
            base = self._base(j)
            if base is not None:
                return self._to_tensor(self._augment(base, rng)), self.labels[j]
        raise GuidedError(f"none of the {n} images in {self.root} could be read")

    def _augment(self, base: np.ndarray, rng) -> np.ndarray:
        arr = random_crop_arr(Image.fromarray(base), self.image_size, rng) if self.random_crop else base
        if self.random_flip and rng.random() < 0.5:  # reference: flip after the crop
            arr = arr[:, ::-1]
        return arr

    def _to_tensor(self, arr: np.ndarray) -> torch.Tensor:
        if self.channels == 1:
            arr = np.array(Image.fromarray(np.ascontiguousarray(arr)).convert("L"))[..., None]
        arr = arr.astype(np.float32) / 127.5 - 1  # reference scaling to [-1, 1]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
