"""Image files: finding them, decoding them robustly, and ADM's preprocessing.

`center_crop_arr` and `random_crop_arr` reproduce
guided_diffusion/image_datasets.py of openai/guided-diffusion exactly, except
that the random choices come from a `random.Random` passed in (so a resumed
run can replay them) instead of the global `random` module.

Mode conversion (`to_rgb`): CMYK, greyscale (L, 1), palette (P) and other
modes go through PIL's convert("RGB").  16-bit images (I;16*, I) are scaled
0..65535 -> 0..255 (PIL's own conversion would clip them to white).  Images
with transparency (RGBA, LA, PA, P with a transparent colour) are
composited on white; the reference drops alpha instead, so only transparent
pixels differ.  EXIF orientation is ignored, as in the reference.
"""

from __future__ import annotations

import math
import os
import random
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff", "ppm", "pgm"})


class BadImage(Exception):
    """An image file that cannot be decoded (empty, truncated, not an image)."""


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def list_image_files(root: str) -> list[str]:
    """Image paths under root, recursively, in sorted order.

    Mirrors the reference's `_list_image_files_recursively` (sorted entries,
    extension test, recursion into folders) with more extensions.
    """
    results = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir():
            results.extend(list_image_files(entry.path))
        elif is_image_name(entry.name):
            results.append(entry.path)
    return results


def warn_skipped(path: str, why: str) -> None:
    warnings.warn(f"skipping unreadable image {path}: {why}", stacklevel=3)


def load_rgb(path: str) -> Image.Image:
    """Decode an image fully and convert it to RGB; raise BadImage if it cannot be read."""
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file")
        with Image.open(path) as img:
            img.load()  # decode now, so truncation shows up here
            return to_rgb(img)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(str(e) or type(e).__name__) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (see the module doc for the choices made)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def box_halve(pil_image: Image.Image, smaller_dim_size: int) -> Image.Image:
    # Reference: "We are not on a new enough PIL to support the `reducing_gap`
    # argument, which uses BOX downsampling at powers of two first. Thus, we
    # do it by hand to improve downsample quality."
    while min(*pil_image.size) >= 2 * smaller_dim_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    return pil_image


def _resize_min_side(pil_image: Image.Image, size: int) -> np.ndarray:
    scale = size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    return np.array(pil_image)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Reference `center_crop_arr`: BOX halvings, bicubic to min side, centre crop (HWC uint8)."""
    arr = _resize_min_side(box_halve(pil_image, image_size), image_size)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def random_crop_sizes(image_size: int, min_crop_frac=0.8, max_crop_frac=1.0) -> tuple[int, int]:
    """The range of min-side sizes the reference's random crop resizes to."""
    return math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac)


def random_crop_arr(pil_image: Image.Image, image_size: int, rng: random.Random = random,
                    min_crop_frac=0.8, max_crop_frac=1.0) -> np.ndarray:
    """Reference `random_crop_arr`: resize the min side to a random size in
    [ceil(s/max_frac), ceil(s/min_frac)], then crop s x s at a random place."""
    lo, hi = random_crop_sizes(image_size, min_crop_frac, max_crop_frac)
    smaller_dim_size = rng.randrange(lo, hi + 1)
    arr = _resize_min_side(box_halve(pil_image, smaller_dim_size), smaller_dim_size)
    crop_y = rng.randrange(arr.shape[0] - image_size + 1)
    crop_x = rng.randrange(arr.shape[1] - image_size + 1)
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]
