"""The feature-extractor interface and the loop that runs one over image batches.

A `FeatureExtractor` maps a batch of uint8 N x H x W x C images (C = 3, or 1 for
grey) to a dict of float numpy arrays:

    "pool"    N x D  pooled features      (FID or FD, precision/recall)
    "spatial" N x S  spatial features     (sFID; optional)
    "probs"   N x K  class probabilities  (Inception Score; optional)

The networks that implement it (guided.evaluation.features, guided.evaluation.judge)
import this module; it imports none of them.
"""

import numpy as np
from tqdm.auto import tqdm

from guided.errors import GuidedError


class FeatureExtractor:
    """Interface: `extract(images_uint8_nhwc) -> {"pool", "spatial", "probs"}`.

    `name` names the feature space in cache files; `cache_key` changes whenever the
    features would (different weights), so cached reference statistics are redone.
    """

    name = "base"
    fd_key = "fid"  # the name of the Frechet distance in this feature space
    # True where a reference npz's own mu/sigma/mu_s/sigma_s (the paper's published
    # reference batches carry them) were made in this feature space and may be used.
    uses_npz_stats = False

    @property
    def cache_key(self):
        return self.name

    def extract(self, images):
        raise NotImplementedError


def check_images(images):
    """Validate a uint8 N x H x W x C batch (C = 1 or 3); return it as a numpy array."""
    images = np.require(images, requirements="W")  # writable: torch.from_numpy warns otherwise
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise GuidedError(
            f"images must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} of shape {images.shape}")
    return images


def compute_features(extractor, batches, total=None, progress=True, desc="features"):
    """Run `extractor` over an iterable of uint8 NHWC batches; concatenate each output."""
    out = {}
    for batch in tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress):
        for key, value in extractor.extract(check_images(batch)).items():
            out.setdefault(key, []).append(np.asarray(value))
    if not out:
        raise GuidedError("no images to compute features from")
    return {key: np.concatenate(parts) for key, parts in out.items()}
