"""Shared tiny configs: networks small enough that a training step takes milliseconds on a CPU."""
from __future__ import annotations

import pytest
import torch

from guided.config import load_config

# One intra-op thread for the whole session: the tests' tensors are tiny (threads only contend
# on a 2-core CI machine), and the two-process tests fork, which an OpenMP pool does not survive
# (a forked child that touches it waits forever).
torch.set_num_threads(1)

TINY_UNET = [
    "model.image_size=8", "model.model_channels=32", "model.num_res_blocks=1", "model.channel_mult=[1,2]",
    "model.attention_resolutions=[4]", "model.num_head_channels=32", "model.dropout=0.1",
    "model.num_classes=10", "model.null_class=true", "model.learn_sigma=true",
    "diffusion.steps=100", "diffusion.noise_schedule=cosine", "diffusion.variance=learned_range",
]
TINY_CLASSIFIER = [
    "classifier.image_size=8", "classifier.model_channels=32", "classifier.num_res_blocks=1",
    "classifier.channel_mult=[1,2]", "classifier.attention_resolutions=[4]", "classifier.num_head_channels=32",
    "diffusion.steps=100", "diffusion.noise_schedule=cosine",
]
TINY_TRAIN = ["data.kind=digits", "data.image_size=8", "train.batch_size=8", "train.steps=4", "train.log_every=2",
              "train.save_every=2", "train.tracker=none", "train.num_threads=1", "train.ema_rates=[0.9]"]


def tiny_config(kind: str, out_dir, *extra: str):
    """A RunConfig for a few-step run of the diffusion (kind="diffusion") or classifier trainer."""
    nets = TINY_UNET if kind == "diffusion" else TINY_CLASSIFIER + ["train.lr=3e-4", "train.weight_decay=0.05",
                                                                    "train.anneal_lr=true", "train.eval_images=32"]
    return load_config(None, nets + TINY_TRAIN + [f"train.out_dir={out_dir}", *extra])


@pytest.fixture
def tiny(tmp_path):
    """tiny(kind, *overrides) -> a config writing into a fresh folder under tmp_path."""
    count = iter(range(1000))

    def make(kind="diffusion", *extra):
        return tiny_config(kind, tmp_path / f"run{next(count)}", *extra)
    return make


@pytest.fixture(autouse=True)
def _restore_torch_threads():  # tests that change the count (the trainers' num_threads) put it back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
