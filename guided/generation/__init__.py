"""Generation: the library behind sample_guided.py. A pipeline (score model, classifier, guides,
label map) is loaded from typed arguments (`load_pipeline`); `SampleOptions` select a sampler of the
registry and guidance terms; `sample_batch` draws one batch with one random generator per sample,
and `generate` writes N samples through a resumable npz writer.

    from guided.generation import load_pipeline, SampleOptions, sample_batch, generate
    p = load_pipeline("uncond")                       # a shipped model, a run folder, or an ADM checkpoint
    x = sample_batch(p, [7] * 4, range(4), SampleOptions(sampler="ddim", steps="50", scale=4))
"""
from guided.generation.images import grid_image, plan_labels, to_uint8
from guided.generation.loading import load_pipeline
from guided.generation.options import METHODS, SampleOptions
from guided.generation.pipeline import Pipeline, check_labels, sample_batch
from guided.generation.writer import generate, save_grid, save_npz

__all__ = ["Pipeline", "SampleOptions", "METHODS", "load_pipeline", "sample_batch", "generate", "check_labels",
           "to_uint8", "grid_image", "plan_labels", "save_grid", "save_npz"]
