"""A pipeline: the score model adapted once, its guides and label map; one batch drawn from it.

`Pipeline` bundles the score network, its diffusion settings (adapted once to a
guided.diffusion.models.ScoreModel), an optional noise-aware classifier, the networks of the other
guidance terms and the label map. `sample_batch` draws one batch with any sampler of the registry
(guided/samplers/registry.py) and any guidance terms (guided/guidance): sample i uses the generator
seeded with seeds[i], so images do not depend on the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from guided.diffusion.models import ScoreModel
from guided.diffusion.objectives import adapt
from guided.errors import GuidedError
from guided.generation.options import METHODS, SampleOptions
from guided.guidance.terms import Guidance, Term
from guided.samplers.discrete import SampleNoise
from guided.samplers.registry import Job, sampler_for
from guided.samplers.sdedit import SDEdit


@dataclass
class Pipeline:
    model: torch.nn.Module
    diffusion_cfg: object  # DiffusionConfig node
    classifier: Optional[torch.nn.Module] = None
    label_map: object = None  # guided.data.labels.LabelMap or None
    name: str = "model"
    objective: str = "eps"  # how the model was trained: eps | vp_dsm (eps networks) | ncsn (score network)
    ncsn_sigmas: Optional[torch.Tensor] = None  # the noise ladder of an NCSN model
    unconditional: bool = False  # sample a label-dropout model's null class (its unconditional score)
    weak_model: Optional[torch.nn.Module] = None  # autoguidance's weaker model, same conditioning
    x0_classifier: Optional[torch.nn.Module] = None  # a classifier of clean images, for x0-classifier guidance

    def __post_init__(self):
        m = self.model.cfg
        for what, net in (("classifier", self.classifier), ("x0 classifier", self.x0_classifier),
                          ("weak model", self.weak_model)):
            c = getattr(net, "cfg", None)
            if c is not None and (c.image_size != m.image_size or c.in_channels != m.in_channels):
                raise GuidedError(f"the {what} takes {c.image_size}x{c.image_size}x{c.in_channels} images but the "
                                  f"score model makes {m.image_size}x{m.image_size}x{m.in_channels}: use a matching pair")
        if self.weak_model is not None and self.weak_model.num_classes != self.model.num_classes:
            raise GuidedError("the autoguidance model must have the main model's conditioning "
                              f"({self.model.num_classes} classes, not {self.weak_model.num_classes})")
        if self.unconditional and not getattr(m, "null_class", False):
            raise GuidedError("only a model trained with label dropout (model.null_class) has an unconditional score")
        self.score_model: ScoreModel = adapt(self.diffusion_cfg, self.objective, self.ncsn_sigmas,
                                             learned_variance=bool(getattr(m, "learn_sigma", False)))

    @property
    def conditional(self) -> bool:
        """Whether the network itself takes the asked labels."""
        return self.model.num_classes is not None and not self.unconditional

    @property
    def num_classes(self) -> Optional[int]:
        if self.model.num_classes is not None:
            return self.model.num_classes
        return self.classifier.cfg.num_classes if self.classifier is not None else None

    def shape(self) -> tuple[int, int, int]:
        cfg = self.model.cfg
        return (cfg.in_channels, cfg.image_size, cfg.image_size)


def check_labels(p: Pipeline, labels, opts: SampleOptions):
    """Refuse labels or guidance the pipeline cannot serve, in one line."""
    n = p.num_classes
    if n is None and (opts.scale or opts.cfg_scale != 1.0):
        raise GuidedError("guidance needs a class-conditional model or a classifier; neither was given")
    if n is not None and any(not 0 <= int(y) < n for y in labels):
        raise GuidedError(f"class {max(labels)} is outside the model's {n} classes (0..{n - 1})")
    if opts.scale and p.classifier is None:
        raise GuidedError("--scale needs a noise-aware classifier (--classifier)")
    k = p.classifier.cfg.num_classes if opts.scale else None
    if k is not None and any(not 0 <= int(y) < k for y in labels):
        raise GuidedError(f"class {max(labels)} is outside the classifier's {k} classes (0..{k - 1}): guide with a "
                          f"classifier of the model's classes")
    if opts.cfg_scale != 1.0 and not (getattr(p.model.cfg, "null_class", False) and p.conditional):
        raise GuidedError("--cfg-scale needs a class-conditional model trained with label dropout (model.null_class)")
    if opts.autoguide_scale != 1.0 and p.weak_model is None:
        raise GuidedError("--autoguide-scale needs a weaker model (--autoguide)")
    if opts.x0_scale and p.x0_classifier is None:
        raise GuidedError("--x0-scale needs a classifier of clean images (--x0-classifier)")


def guidance(p: Pipeline, opts: SampleOptions) -> Guidance:
    """The guidance terms the options ask for (one per entry of options.METHODS), over the pipeline's networks."""
    terms = []
    for m in METHODS:
        net = getattr(p, m.network) if m.network else None
        kw = {"schedule": getattr(opts, m.schedule)} if m.schedule else {}
        if m.temperature:
            kw["temperature"] = getattr(opts, m.temperature)
        if m.term == "classifier":
            kw["calibrated"] = opts.calibration
        if m.term == "x0_classifier":
            net = _clean_classifier(net)
        terms.append(Term(m.term, getattr(opts, m.scale), net, getattr(opts, m.interval), **kw))
    null = p.model.num_classes if getattr(p.model.cfg, "null_class", False) else None
    return Guidance(terms, p.score_model.sigma_of, null_label=null)


def _clean_classifier(net):
    """classify(x0) -> logits of a clean-image classifier: one of ours sees timestep 0, any other module x0 alone."""
    if net is None or not hasattr(net, "cfg"):
        return net
    return lambda x0: net(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device))


def network_labels(p: Pipeline, y: torch.Tensor) -> Optional[torch.Tensor]:
    """What the score network is given: the asked labels, the null class, or nothing."""
    if p.model.num_classes is None:
        return None
    return torch.full_like(y, p.model.num_classes) if p.unconditional else y


def guided_functions(p: Pipeline, y: torch.Tensor, opts: SampleOptions):
    """(model_fn, cond_fn) of the pipeline for labels y: every sampler's guidance."""
    g = guidance(p, opts)
    model_fn = g.model_fn(p.model, network_labels(p, y))
    denoise = p.score_model.denoiser(model_fn) if opts.x0_scale else None
    return model_fn, g.cond_fn(y, denoise)


def sample_batch(p: Pipeline, labels, seeds, opts: SampleOptions, *, device="cpu", progress=False,
                 init=None, x_T: Optional[torch.Tensor] = None, preview=None) -> torch.Tensor:
    """Draw len(labels) samples in [-1, 1]; sample i uses the generator seeded with seeds[i].
    `init` (SDEdit): a guided.samplers.sdedit.SDEdit, or a dict with `image` [C,H,W] in [-1, 1],
    `t0` in (0, 1] and an optional `mask` [1,H,W] (1 = may change). `x_T`: start from this noise
    instead of drawing it. `preview(done, x0)`, if given, is called along the way with the share of
    the reverse process done, in (0, 1], and the current denoised prediction (the x0 estimate)."""
    spec = sampler_for(opts.sampler, p.score_model)
    return spec.run(make_job(p, labels, SampleNoise(seeds, torch.device(device)), opts, sdedit=SDEdit.of(init),
                             x_T=x_T, progress=progress, preview=preview))


def make_job(p: Pipeline, labels, noise: SampleNoise, opts: SampleOptions, **kw) -> Job:
    """The registry's Job of one batch: the pipeline's model, its guided functions for the labels, the options."""
    y = torch.as_tensor(list(labels), device=noise.device, dtype=torch.long)
    model_fn, cond_fn = guided_functions(p, y, opts)
    return Job(p.score_model, model_fn, cond_fn, noise, p.shape(), steps=str(opts.steps), eta=opts.eta,
               clip_denoised=opts.clip_denoised, clip_guided=opts.clip_guided, ddpm_form=opts.ddpm_form,
               extra=dict(opts.extra), precision=opts.precision, **kw)
