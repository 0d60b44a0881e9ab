"""Images and labels of generated batches: uint8 conversion, the class grid, the label plan."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from guided.errors import GuidedError


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, as the reference's sample script does; a one-channel (grey) model's
    samples become three equal channels, the RGB layout of the paper's evaluation batches."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_statistics(images: np.ndarray) -> dict:
    """Shares of a uint8 NHWC batch: pixel values at 0 ("black") and at 255 ("white"), and
    neighbouring pixel pairs (across and down) that jump from one extreme to the other ("speckle")."""
    a = np.asarray(images)
    low, high = a == 0, a == 255
    jumps = [(low[:, 1:] & high[:, :-1]) | (high[:, 1:] & low[:, :-1]),
             (low[:, :, 1:] & high[:, :, :-1]) | (high[:, :, 1:] & low[:, :, :-1])]
    pairs = sum(j.size for j in jumps)
    return {"black": float(low.mean()), "white": float(high.mean()),
            "speckle": float(sum(j.sum() for j in jumps) / max(pairs, 1))}


# What a ruined batch looks like (scripts/ruin_study.py on the shipped digits models, docs/guide/sampling.md "Ruined
# batches"): guidance far too strong drives the x0 prediction into the clip at both ends, so large
# areas sit at 0 AND at 255 (inverted blobs), and at the extreme neighbouring pixels jump from one end
# to the other (speckle). Healthy batches and the real digits have at most 1% at 255 and no speckle,
# at any share of black background; ruined ones 3-26% at 255 beside 9-28% at 0, speckle up to 2%.
BOTH_ENDS = 0.03  # share of pixels at 0 and, separately, at 255
SPECKLE = 0.001  # share of neighbouring pixel pairs that jump between 0 and 255
FLAT = 0.95  # share of pixels at one end: an image with (almost) nothing in it


def ruin(images: np.ndarray) -> Optional[str]:
    """Why a uint8 NHWC batch looks ruined, or None: large areas at both ends of the pixel range,
    speckle between them, or (almost) every pixel at one end."""
    s = image_statistics(images)
    both = min(s["black"], s["white"]) >= BOTH_ENDS
    if both or s["speckle"] >= SPECKLE or max(s["black"], s["white"]) >= FLAT:
        return (f"{s['black']:.0%} of its pixels are at 0 and {s['white']:.0%} at 255"
                + (f", {s['speckle']:.1%} of neighbouring pixels jump from one to the other" if s["speckle"] else ""))
    return None


GRID_WIDTH = 20  # a grid wraps a class's samples into rows of at most this many


def grid_image(images: np.ndarray, labels: np.ndarray, columns: int = 10, min_cell: int = 64):
    """Up to `columns` samples of each class, each class on rows of its own (wrapped at GRID_WIDTH),
    upscaled so small images stay visible (a PIL image)."""
    from PIL import Image

    groups = [images[labels == c][:columns] for c in np.unique(labels)] if len(labels) else [images[:columns]]
    width = min(columns, GRID_WIDTH)
    rows = [g[i:i + width] for g in groups for i in range(0, max(len(g), 1), width)]
    h, w, ch = images.shape[1:]
    zoom = max(1, min_cell // max(h, w))
    grid = np.full((len(rows) * (h + 2), width * (w + 2), ch), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = img
    pil = Image.fromarray(grid[..., 0] if ch == 1 else grid)
    return pil.resize((pil.width * zoom, pil.height * zoom), Image.NEAREST)


CLASS_SAMPLING = ("balanced", "random")


LABEL_CHUNK = 4096  # random class sampling draws the labels of samples in chunks of this many


def labels_of(classes: list[int], idx, sampling: str = "balanced", seed: int = 0) -> np.ndarray:
    """The labels samples `idx` ask for: classes[i % K] ("balanced"), or a class drawn uniformly at
    random with replacement ("random", the paper's sampling scripts), drawn per chunk of LABEL_CHUNK
    samples from (seed, chunk), so any sample's label is found without planning the others and
    the plan is the same at any batch size; an unconditional model gets label -1."""
    if sampling not in CLASS_SAMPLING:
        raise GuidedError(f"class sampling must be one of {', '.join(CLASS_SAMPLING)}, not {sampling!r}")
    idx = np.asarray(idx, dtype=np.int64)
    if not classes:
        return np.full(len(idx), -1, dtype=np.int64)
    if sampling == "balanced":
        return np.asarray(classes, dtype=np.int64)[idx % len(classes)]
    chunks = {c: np.random.default_rng([seed, c]).integers(len(classes), size=LABEL_CHUNK)
              for c in np.unique(idx // LABEL_CHUNK).tolist()}
    return np.asarray(classes, dtype=np.int64)[[chunks[i // LABEL_CHUNK][i % LABEL_CHUNK] for i in idx.tolist()]]


def plan_labels(classes: list[int], num_samples: int, sampling: str = "balanced", seed: int = 0) -> np.ndarray:
    return labels_of(classes, np.arange(num_samples), sampling, seed)


def say(message: str) -> None:
    """A note or warning on stderr, on a line of its own under a progress bar."""
    tqdm.write(message, file=sys.stderr)


