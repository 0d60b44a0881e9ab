"""Feature networks for the metrics, and the registry that makes one by name.

Each is a `guided.evaluation.extractor.FeatureExtractor` (uint8 NHWC images in; "pool",
"spatial" and "probs" feature arrays out). Three of them: `InceptionFeatures`, the FID
Inception-v3 network the ADM paper evaluates with (through torch-fidelity);
`DINOv2Features`, DINOv2 ViT-L/14 (through timm) for FD-DINOv2 as EDM2 reports it; and
the digits judge of `guided.evaluation.judge`, a small independent classifier for the
embedded 8x8-digits data set. `get_extractor` makes one by name. Weights are never
downloaded: a missing file is one line that says where to put it.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from guided.errors import GuidedError
from guided.evaluation.extractor import FeatureExtractor, check_images, compute_features  # noqa: F401 - re-exported
from guided.evaluation.judge import load_judge
from guided.networks.adm import load_state_dict_strict
from guided.networks.checkpoints import read_state_dict

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid's name for the same converted network (same sha256 prefix 6726825d, same keys).
INCEPTION_NAMES = (INCEPTION_FILENAME, "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "GUIDED_INCEPTION_WEIGHTS"
INCEPTION_URLS = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILENAME,
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
)


@dataclass(frozen=True)
class WeightsFile:
    """A feature network's weights file: looked for locally, never downloaded."""
    what: str                 # "Inception", "DINOv2 ViT-L/14"
    names: tuple              # accepted file names; the first is the one to download
    env: str                  # environment variable that may point at it
    flag: str                 # the command-line option that may point at it
    urls: tuple               # where a person can get it (first: the file named first)
    source: str = ""          # a note on where else the same network is published


INCEPTION_WEIGHTS = WeightsFile(
    "Inception", INCEPTION_NAMES, INCEPTION_ENV, "--inception-weights", INCEPTION_URLS,
    "torch-fidelity's release; pytorch-fid publishes the same network as " + INCEPTION_URLS[1])


def find_weights(spec, path=None):
    """Locate a weights file; never downloads.

    Looks at `path` (a file, or a folder holding it under an accepted name), then
    $ENV, then ~/.cache/guided/ and torch hub's checkpoint folder (where torch-fidelity
    or torch.hub would have put it). Raises GuidedError saying where to put it.
    """
    given = path or os.environ.get(spec.env)
    if given:
        p = Path(given).expanduser()
        found = _weights_in(p, spec.names) if p.is_dir() else (p if p.is_file() else None)
        if found:
            return str(found)
        raise GuidedError(f"{spec.what} weights not found at {p}; download {spec.urls[0]} yourself "
                          f"and pass its path")
    folders = [Path.home() / ".cache" / "guided", Path(torch.hub.get_dir()) / "checkpoints"]
    for folder in folders:
        if found := _weights_in(folder, spec.names):
            return str(found)
    note = f" ({spec.source})" if spec.source else ""
    raise GuidedError(
        f"{spec.what} weights {spec.names[0]} not found; download them from {spec.urls[0]}{note} "
        f"and put the file in {folders[0]}/, or pass {spec.flag} PATH, or set {spec.env}")


def find_inception_weights(path=None):
    """Locate `weights-inception-2015-12-05-6726825d.pth` (see find_weights)."""
    return find_weights(INCEPTION_WEIGHTS, path)


def _weights_in(folder, names):
    return next((folder / n for n in names if (folder / n).is_file()), None)


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


DINOV2_WEIGHTS = WeightsFile(
    "DINOv2 ViT-L/14", ("dinov2_vitl14_pretrain.pth", "vit_large_patch14_dinov2.lvd142m.safetensors"),
    "GUIDED_DINOV2_WEIGHTS", "--dinov2-weights",
    ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth",),
    "Meta's release, the file torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14') fetches; timm's "
    "vit_large_patch14_dinov2.lvd142m model.safetensors holds the same weights")
# timm's ViT-L/14 as DINOv2 trained it (LayerScale, a 37 x 37 position grid for 518 px),
# built for FD-DINOv2's 224 x 224 input.
DINOV2_VITL14 = {"model_name": "vit_large_patch14_dinov2", "img_size": 224}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_state_dict(state, net):
    """A DINOv2 state dict (Meta's release or timm's) made to fit timm's ViT `net`.

    Drops the masked-modelling token and resamples the position grid to the net's input
    exactly as DINOv2's `interpolate_pos_encoding` does at every forward pass (bicubic,
    no antialiasing, scale factor (g + 0.1) / G), so the fixed 224 x 224 net computes what
    the hub model computes on a 224 x 224 image.
    """
    state = {k: v for k, v in state.items() if k != "mask_token"}
    pos, own = state.get("pos_embed"), net.pos_embed
    if pos is None or pos.shape == own.shape:
        return state
    big, small = math.isqrt(pos.shape[1] - 1), math.isqrt(own.shape[1] - 1)
    if pos.ndim != 3 or big * big != pos.shape[1] - 1:
        raise GuidedError(f"pos_embed of shape {tuple(pos.shape)} is not a square position grid plus a class token")
    grid = pos[:, 1:].float().reshape(1, big, big, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((small + 0.1) / big,) * 2, mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, small * small, -1)
    state["pos_embed"] = torch.cat([pos[:, :1].float(), grid], 1).to(pos.dtype)
    return state


def _read_weights(path):
    if not str(path).endswith(".safetensors"):
        return read_state_dict(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise GuidedError(f"cannot read {path} as safetensors ({str(e).splitlines()[0]})") from None


class DINOv2Features(FeatureExtractor):
    """DINOv2 ViT-L/14 (Oquab et al. 2023) for FD-DINOv2 (Stein et al. 2023), as EDM2 reports it.

    pool = the class token after the final norm, 1024 dims (the hub model's output). There
    are no spatial features or class probabilities: no sFID and no Inception Score here.
    Input as EDM2's detector: grey repeated to RGB, resized to 224 x 224 (bicubic with
    antialiasing, its 'torch' mode), scaled to [0, 1], normalised by ImageNet's mean and std.
    `arch`: timm.create_model arguments; ViT-L/14 for real use (tests pass a tiny ViT).
    """

    name = "dinov2"
    fd_key = "fd_dinov2"

    def __init__(self, weights_path=None, device=None, arch=DINOV2_VITL14):
        try:
            import timm
        except ImportError:
            raise GuidedError('FD-DINOv2 needs timm: pip install -e ".[dinov2]" (or pip install timm)') from None

        path = find_weights(DINOV2_WEIGHTS, weights_path)
        net = timm.create_model(pretrained=False, num_classes=0, **arch)
        load_state_dict_strict(net, dinov2_state_dict(_read_weights(path), net), f"DINOv2 weights {path}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = net.to(self.device).eval()
        self.size = net.patch_embed.img_size
        self._key = f"dinov2-{arch['model_name']}-{os.path.getsize(path)}"

    @property
    def cache_key(self):
        return self._key

    @torch.inference_mode()
    def extract(self, images):
        x = torch.from_numpy(check_images(images)).to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=tuple(self.size), mode="bicubic", antialias=True) / 255
        mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return {"pool": self.net((x - mean) / std).float().cpu().numpy()}


FEATURES = ("inception", "dinov2", "digits")


def get_extractor(kind="inception", image_size=None, inception_weights=None, device=None, dinov2_weights=None):
    """Make an extractor by name: "inception", "dinov2", or "digits" (the judge for `image_size`)."""
    if kind == "inception":
        return InceptionFeatures(inception_weights, device=device)
    if kind == "dinov2":
        return DINOv2Features(dinov2_weights, device=device)
    if kind == "digits":
        return load_judge(image_size or 16)
    raise GuidedError(f"unknown feature extractor {kind!r}; use one of {', '.join(FEATURES)}")
