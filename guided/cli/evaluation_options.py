"""The command-line options that pick a feature network, shared by the programs that measure samples.

guided.cli.evaluate, guided.cli.reference_batch and guided.cli.sweep each call
`add_feature_options` once; the values go on to `guided.evaluation.features.get_extractor`.
"""
from __future__ import annotations

import numpy as np

from guided.errors import GuidedError
from guided.evaluation.features import FEATURES, find_inception_weights

FEATURES_HELP = ("feature network: the paper's Inception-v3, DINOv2 ViT-L/14 (FD-DINOv2; pip install "
                 "'.[dinov2]'), or the digits judge (default: inception)")


DIGITS_MAX_SIZE = 32  # --features auto: grey images this small are digits (the shipped models make 16 px ones)


def _grey(images) -> bool:
    batch = next(images.batches(64))
    return batch.shape[-1] == 1 or bool((batch == batch[..., :1]).all())


def auto_features(*files, inception_weights=None) -> str:
    """--features auto: the digits judge when every file holds grey images of at most DIGITS_MAX_SIZE
    pixels (the digits set, as the shipped models and `reference_batch digits` write it), else the
    paper's Inception (also whenever its weights are named), whose missing weights are one line naming
    the other ways."""
    from guided.evaluation.evaluate import NpzImages

    images = [NpzImages(f) for f in files]
    if inception_weights is None and all(i.shape[1] <= DIGITS_MAX_SIZE and _grey(i) for i in images):
        return "digits"
    try:
        find_inception_weights(inception_weights)
    except GuidedError as e:
        raise GuidedError(f"{e}; or pick another feature space: --features dinov2, or --features digits for "
                          "digits") from None
    return "inception"


def add_feature_options(parser, *, default="inception", choices=FEATURES, features_help=FEATURES_HELP,
                        batch_size=True):
    """Add --features, --inception-weights, --dinov2-weights and (with `batch_size`) --batch-size
    to `parser` (an ArgumentParser or an argument group); return it.

    `default` and `choices` are --features' (a program may accept more names than FEATURES,
    such as "auto" or "none", and resolve them itself).
    """
    parser.add_argument("--features", choices=choices, default=default, help=features_help)
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="weights-inception-2015-12-05-6726825d.pth (else $GUIDED_INCEPTION_WEIGHTS, "
                             "~/.cache/guided/)")
    parser.add_argument("--dinov2-weights", metavar="PATH",
                        help="dinov2_vitl14_pretrain.pth (else $GUIDED_DINOV2_WEIGHTS, ~/.cache/guided/)")
    if batch_size:
        parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default: 64)")
    return parser
