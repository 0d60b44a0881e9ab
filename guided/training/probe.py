"""A cheap quality probe for score models of the digits data, run during training.

Every `train.probe_every` steps the trainer draws `train.probe_samples` samples from
its EMA weights (DPM-Solver++(2M), 25 quadratically spaced steps for eps models;
annealed Langevin for NCSN models), class-balanced for a conditional model, and
scores them with the independent digits judge (guided.evaluation.judge, not a guidance
classifier): the Frechet distance in the judge's 64-d feature space to the
held-out digits (Heusel et al. 2017, eq. 6), the judge's accuracy on the asked
class, and the mean pixel. The same distance between as many training digits and
the held-out ones is logged once as `probe_fid_floor`: what real data reach at this
sample count. The curve shows when a model stops improving (docs/guide/digits-models.md).
"""
from __future__ import annotations

import functools

import numpy as np

from guided.evaluation.judge import digits_data, load_judge, split_indices
from guided.evaluation.metrics import feature_stats, frechet_distance
from guided.generation import SampleOptions, plan_labels, sample_batch, to_uint8
from guided.generation import load_pipeline
from guided.training.posthoc_ema import export_posthoc, reconstruct, snapshots

PROBE_OPTIONS = {"eps": dict(sampler="dpm++", steps="quad25"),  # per ScoreModel kind
                 "score": dict(sampler="langevin")}  # the ladder is its steps
PROBE_SEED = 1_000_003  # fixed: every probe of a run draws the same noise


@functools.lru_cache(maxsize=4)
def heldout_stats(image_size: int):
    """(mu, sigma) of the judge's pool features on the 297 held-out digits."""

    images, _ = digits_data(image_size)
    return feature_stats(load_judge(image_size).extract(images[split_indices()[1]])["pool"])


def judge_fid(images: np.ndarray) -> float:
    """Judge-space Frechet distance of uint8 NHWC images to the held-out digits."""

    size = images.shape[1]
    mu, sigma = feature_stats(load_judge(size).extract(images)["pool"])
    return float(frechet_distance(mu, sigma, *heldout_stats(size)))


def fid_floor(image_size: int, n: int, seed: int = 0) -> float:
    """The judge-space distance of n real training digits (drawn without replacement) to the held-out ones."""

    images, _ = digits_data(image_size)
    train = split_indices()[0]
    pick = np.random.default_rng(seed).choice(train, size=min(n, len(train)), replace=False)
    return judge_fid(images[pick])


def probe(pipeline, n: int, device="cpu", batch_size: int = 300, null: bool = False) -> dict:
    """Sample n images from `pipeline` and score them: probe_fid, probe_acc (conditional), probe_mean_pixel.
    null: sample a label-dropout model's null class (its unconditional score) instead."""

    conditional = pipeline.model.num_classes is not None and not null
    labels = plan_labels(list(range(10)) if conditional else [], n)
    if null:
        labels = np.full(n, pipeline.model.num_classes)
    opts = SampleOptions(**PROBE_OPTIONS[pipeline.score_model.kind])
    out = []
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        x = sample_batch(pipeline, np.maximum(labels[idx], 0), PROBE_SEED + idx, opts, device=device)
        out.append(to_uint8(x))
    images = np.concatenate(out)
    stats = {"probe_fid": judge_fid(images), "probe_mean_pixel": float(images.mean())}
    if conditional:
        stats["probe_acc"] = load_judge(images.shape[1]).accuracy(images, labels)
    return stats


def probe_ema_lengths(run_dir, sigma_rels, n: int = 300, step: int | None = None, device="cpu") -> list[dict]:
    """The probe of post-hoc EMAs of several widths (guided.training.posthoc_ema) of one run: the EMA length
    picked by the judge after training. One dict per sigma_rel: sigma_rel, step, coefficients' sum, probe_*."""
    import tempfile
    from pathlib import Path


    step = step or snapshots(run_dir)[-1]["step"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in sigma_rels:
            path = export_posthoc(run_dir, s, Path(tmp) / f"phema_{s}.pt", step)
            coefficients = reconstruct(run_dir, s, step)[1]
            stats = probe(load_pipeline(str(path), classifier="none", device=device), n, device=device)
            rows.append({"sigma_rel": s, "step": step, "coefficient_sum": float(sum(coefficients)), **stats})
    return rows
