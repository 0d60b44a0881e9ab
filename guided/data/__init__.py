"""Training data for guided: image folders, the embedded digits set, sharded batches.

`build_dataset(cfg)` reads these keys (a dict, an OmegaConf node or a
dataclass; keys it does not know, such as num_workers, are ignored):

  kind         "digits"  "digits": scikit-learn's 8x8 digits, no files needed;
                         "imagenet": root/<wnid>/*.JPEG (class = folder);
                         "folder": flat root/<class>_*.png (class = file-name
                         prefix, as the reference trainer reads it);
                         "auto": "imagenet" if a sub-folder holds images, else "folder".
  root         None      the data folder (required unless kind is "digits")
  image_size   16        output height = width
  classes      None      None = all; an int K = the first K classes in sorted
                         order; a list of wnids / prefixes / digits (or ImageNet
                         names such as "golden retriever").  Labels are 0..K-1
                         in sorted class-key order.
  random_flip  None      horizontal flip with p=0.5; None = on for image
                         folders (the reference's default), off for digits
  random_crop  False     the reference's random_crop_arr (for the classifier)
  in_memory    None      hold decoded images in memory; None = on when the
                         folder has <= 20,000 images and they fit in ~2 GiB
  split        "train"   "train" or "heldout" (the 297 held-out digits); image
                         folders only have "train" -- point root at a
                         validation folder instead
  channels     3         3 (RGB) or 1 (grey)

Every dataset returns (float32 tensor C x H x W in [-1, 1], int label) and has
`.label_map` (a LabelMap; save it beside checkpoints), `.num_classes`,
`.skipped` and `.skipped_files` (unreadable images passed over).
Batches: `infinite_batches(dataset, batch_size, rank, world_size, seed,
num_workers, state)` (see sampling.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from guided.data.digits import DigitsDataset
from guided.data.folder import ImageFolderDataset, detect_layout
from guided.data.images import center_crop_arr, list_image_files, load_rgb, random_crop_arr, to_rgb
from guided.data.labels import LabelMap, class_name, imagenet_classes, select_classes
from guided.data.sampling import BatchStream, infinite_batches, shard_indices
from guided.errors import GuidedError

DEFAULTS = {"kind": "digits", "root": None, "image_size": 16, "classes": None, "random_flip": None,
            "random_crop": False, "in_memory": None, "split": "train", "channels": 3}
KINDS = {"digits": None, "imagenet": "imagenet", "folder": "flat", "auto": "auto"}

__all__ = ["build_dataset", "DEFAULTS", "DigitsDataset", "ImageFolderDataset", "LabelMap", "BatchStream",
           "infinite_batches", "shard_indices", "imagenet_classes", "class_name", "select_classes",
           "detect_layout", "center_crop_arr", "random_crop_arr", "list_image_files", "load_rgb", "to_rgb"]


def _as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise GuidedError(f"data config must be a mapping or dataclass, not {type(cfg).__name__}")


def build_dataset(cfg=None):
    """The dataset a data config describes (keys and defaults in the module doc)."""
    c = {**DEFAULTS, **{k: v for k, v in _as_dict(cfg).items() if k in DEFAULTS}}
    if c["kind"] not in KINDS:
        raise GuidedError(f"data.kind must be one of {', '.join(KINDS)}, not {c['kind']!r}")
    if not isinstance(c["image_size"], int) or c["image_size"] < 1:
        raise GuidedError(f"data.image_size must be a positive integer, not {c['image_size']!r}")
    if c["channels"] not in (1, 3):
        raise GuidedError(f"data.channels must be 1 or 3, not {c['channels']!r}")
    if c["split"] not in ("train", "heldout"):
        raise GuidedError(f"data.split must be 'train' or 'heldout', not {c['split']!r}")
    if c["kind"] == "digits":
        return DigitsDataset(c["image_size"], split=c["split"], channels=c["channels"], classes=c["classes"],
                             random_flip=bool(c["random_flip"]))
    if not c["root"]:
        raise GuidedError(f"data.kind={c['kind']!r} needs data.root, the folder of images")
    if c["split"] != "train":
        raise GuidedError("data.split='heldout' exists only for kind='digits'; "
                          "point data.root at a validation folder instead")
    flip = True if c["random_flip"] is None else bool(c["random_flip"])
    return ImageFolderDataset(c["root"], c["image_size"], layout=KINDS[c["kind"]], classes=c["classes"],
                              random_flip=flip, random_crop=bool(c["random_crop"]),
                              in_memory=c["in_memory"], channels=c["channels"])
