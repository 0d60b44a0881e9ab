"""Feature extractors for the metrics: uint8 NHWC images in, three feature arrays out.

A `FeatureExtractor` maps a batch of uint8 N x H x W x C images (C = 3, or 1 for
grey) to a dict of float numpy arrays:

    "pool"    N x D  pooled features      (FID, precision/recall)
    "spatial" N x S  spatial features     (sFID)
    "probs"   N x K  class probabilities  (Inception Score)

Two implementations: `InceptionFeatures`, the FID Inception-v3 network the ADM paper
evaluates with (through torch-fidelity), and the digits judge of `guided.judge`, a
small independent classifier for the embedded 8x8-digits data set.
"""

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guided.errors import GuidedError

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid's name for the same converted network (same sha256 prefix 6726825d, same keys).
INCEPTION_NAMES = (INCEPTION_FILENAME, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "GUIDED_INCEPTION_WEIGHTS"
INCEPTION_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME,
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)


class FeatureExtractor:
    """Interface: `extract(images_uint8_nhwc) -> {"pool", "spatial", "probs"}`.

    `name` names the feature space in cache files; `cache_key` changes whenever the
    features would (different weights), so cached reference statistics are redone.
    """

    name = "base"
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


def find_inception_weights(path=None):
    """Locate `weights-inception-2015-12-05-6726825d.pth`; never downloads.

    Looks at `path` (a file, or a folder holding it under either published name), then
    $GUIDED_INCEPTION_WEIGHTS, then ~/.cache/guided/ and torch hub's checkpoint folder
    (where torch-fidelity itself would have put it). Raises GuidedError saying where
    to put it.
    """
    given = path or os.environ.get(INCEPTION_ENV)
    if given:
        p = Path(given).expanduser()
        found = _weights_in(p) if p.is_dir() else (p if p.is_file() else None)
        if found:
            return str(found)
        raise GuidedError(
            f"Inception weights not found at {p}; download {INCEPTION_URLS[0]} (or pytorch-fid's "
            f"{INCEPTION_URLS[1]}) yourself and pass its path")
    folders = [Path.home() / ".cache" / "guided", Path(torch.hub.get_dir()) / "checkpoints"]
    for folder in folders:
        if found := _weights_in(folder):
            return str(found)
    raise GuidedError(
        f"Inception weights {INCEPTION_FILENAME} not found; download them from {INCEPTION_URLS[0]} "
        f"(torch-fidelity's release; pytorch-fid publishes the same network as {INCEPTION_URLS[1]}) "
        f"and put the file in {folders[0]}/, or pass --inception-weights PATH, or set {INCEPTION_ENV}")


def _weights_in(folder):
    return next((folder / n for n in INCEPTION_NAMES if (folder / n).is_file()), None)


class InceptionFeatures(FeatureExtractor):
    """The FID Inception-v3 (TF 2015-12-05 graph) through torch-fidelity's port.

    pool    = pool_3, 2048 dims (the evaluator's `pool_3:0`);
    spatial = `mixed_6/conv:0`, first 7 channels at 17 x 17, flattened in TF's
              H, W, C order = 2023 dims. torch-fidelity names TF's `mixed_6` block
              `Mixed_6d` and its `conv` (1x1 conv + batch norm + ReLU) `branch1x1`, so a
              forward hook on `Mixed_6d.branch1x1` reads the same tensor;
    probs   = softmax of pool_3 @ W over 1008 classes, no bias, as the evaluator's
              softmax graph (torch-fidelity's "logits_unbiased").
    Input resizing to 299 (TF1 bilinear) and scaling (x - 128) / 128 happen inside the
    network as in the TF graph. Remaining differences from the paper's TF run are
    float round-off of the PyTorch port only. One-channel images are repeated to RGB.
    """

    name = "inception"
    uses_npz_stats = True

    def __init__(self, weights_path=None, device=None):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = find_inception_weights(weights_path)
        try:  # always a local path: with None torch-fidelity would download
            net = FeatureExtractorInceptionV3(
                "guided-inception-v3", ["2048", "logits_unbiased"], feature_extractor_weights_path=path)
        except Exception as e:  # noqa: BLE001 - any load failure is a bad weights file
            raise GuidedError(f"could not load Inception weights from {path} ({type(e).__name__}); "
                              f"expected torch-fidelity's {INCEPTION_FILENAME}") from None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # N x 192 x 17 x 17 -> first 7 channels, NHWC flatten like the TF tensor.
        self._spatial = output[:, :7].permute(0, 2, 3, 1).reshape(len(output), -1)

    @torch.inference_mode()
    def extract(self, images):
        x = torch.from_numpy(check_images(images)).to(self.device).permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool, logits = self.net(x.contiguous())
        return {"pool": pool.cpu().numpy(),
                "spatial": self._spatial.float().cpu().numpy(),
                "probs": torch.softmax(logits.double(), 1).cpu().numpy()}


def get_extractor(kind="inception", image_size=None, inception_weights=None, device=None):
    """Make an extractor by name: "inception", or "digits" (the judge for `image_size`)."""
    if kind == "inception":
        return InceptionFeatures(inception_weights, device=device)
    if kind == "digits":
        from guided.judge import load_judge
        return load_judge(image_size or 16)
    raise GuidedError(f"unknown feature extractor {kind!r}; use 'inception' or 'digits'")
