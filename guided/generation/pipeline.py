"""A pipeline: the score model adapted once, its guides and label map; one batch drawn from it.

`Pipeline` bundles the score network, its diffusion settings (adapted once to a
guided.diffusion.models.ScoreModel), an optional noise-aware classifier, the networks of the other
guidance terms, the label map and the model's own sampling defaults. `sample_batch` resolves the
options once against it (guided/generation/resolve.py), wraps the model and its guidance terms into the
one guided denoiser (guided/guidance/denoiser.py), makes the levels of --steps and runs the registry's
sampler (guided/samplers/registry.py) over them: sample i uses the generator seeded with seeds[i], so
images do not depend on the batch size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch

from guided.config import SamplingConfig
from guided.diffusion.models import ScoreModel
from guided.diffusion.space import PIXELS, DataSpace
from guided.diffusion.objectives import adapt
from guided.errors import GuidedError
from guided.generation.options import METHODS, SampleOptions
from guided.generation.resolve import resolve
from guided.guidance.denoiser import GuidedDenoiser
from guided.guidance.terms import Guidance, Term
from guided.samplers.levels import make_levels
from guided.samplers.noise import SampleNoise
from guided.samplers.registry import SAMPLERS
from guided.samplers.sdedit import SDEdit


@dataclass
class Pipeline:
    """A score network adapted once to the samplers' interface (`score_model`), with its noise-aware
    classifier, the networks of the other guidance terms, its label map and its own sampling defaults
    (`defaults`, the `sampling` node of its config). Built by guided.generation.load_pipeline."""
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
    defaults: SamplingConfig = field(default_factory=SamplingConfig)  # the model's own sampling defaults
    classifier_name: Optional[str] = None  # what --classifier named (or the model's default), for the record
    guides: dict = field(default_factory=dict)  # the networks of registered guidance terms, by term name
    classifier_labels: object = None  # the classifier's own label map, where it has one
    classifier_process: Optional[dict] = None  # what the classifier was trained on (diffusion.models.noise_process)
    space: DataSpace = PIXELS  # where the samples live: pixels, or a VAE's latents (guided.diffusion.space.LatentSpace)
    sampler_defaults: dict = field(default_factory=dict)  # the model's own sampler settings: {sampler: {name: value}}

    def __post_init__(self):
        m = self.model.cfg
        self._check_space()
        for what, net in (("classifier", self.classifier), ("x0 classifier", self.x0_classifier),
                          ("weak model", self.weak_model)):
            c = getattr(net, "cfg", None)
            if c is not None:
                _check_shape(what, (c.in_channels, c.image_size, c.image_size),
                             self.image_shape() if what == "x0 classifier" else self.shape(), self.space)
        if self.weak_model is not None and self.weak_model.num_classes != self.model.num_classes:
            raise GuidedError("the autoguidance model must have the main model's conditioning "
                              f"({self.model.num_classes} classes, not {self.weak_model.num_classes})")
        if self.unconditional and not getattr(m, "null_class", False):
            raise GuidedError("only a model trained with label dropout (model.null_class) has an unconditional score")
        self.score_model: ScoreModel = adapt(self.diffusion_cfg, self.objective, self.ncsn_sigmas,
                                             learned_variance=bool(getattr(m, "learn_sigma", False)))
        if self.space is not PIXELS:
            self.score_model.space = self.space  # the samplers see it on the model (guided/diffusion/models.py)

    def _check_space(self):
        """A latent model's VAE must make latents of the network's channels."""
        c = getattr(self.space, "latent_channels", None)
        if c is not None and c != self.model.cfg.in_channels:
            raise GuidedError(f"the VAE makes {c}-channel latents but the network takes {self.model.cfg.in_channels} "
                              f"channels: use the VAE the model was trained with")

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
        """(C, H, W) of what the samplers draw: images, or a latent model's latents."""
        cfg = self.model.cfg
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images written: the decoded latents of a latent model."""
        return self.shape() if self.space.bounded else self.space.image_shape(self.shape())


def _check_shape(what: str, takes: tuple, makes: tuple, space: DataSpace) -> None:
    """A guide network must take what the score model makes (latents for a noise-aware classifier and a
    weak model of a latent model; decoded images for an x0 classifier)."""
    if takes == makes:
        return
    c, h, _ = takes
    if space.bounded:
        raise GuidedError(f"the {what} takes {h}x{h}x{c} images but the score model makes "
                          f"{makes[1]}x{makes[2]}x{makes[0]}: use a matching pair")
    kind = "decoded images" if what == "x0 classifier" else f"latents of its VAE ({space.source})"
    hint = ("a pixel classifier guides a latent model as --x0-classifier (through the decoder), not as --classifier"
            if what == "classifier" else "use a matching pair")
    raise GuidedError(f"the {what} takes {h}x{h}x{c} inputs but this latent model's {kind} are "
                      f"{makes[1]}x{makes[2]}x{makes[0]}: {hint}")


def classifier_indices(p: Pipeline) -> Optional[list]:
    """The classifier's index of each of the model's classes (-1: not among them) where the two have
    different label maps (matched by key: wnid, folder or digit); None where they share one."""
    a, b = p.label_map, p.classifier_labels
    if a is None or b is None or tuple(a.keys) == tuple(b.keys):
        return None
    index = {k: i for i, k in enumerate(b.keys)}
    return [index.get(k, -1) for k in a.keys]


def check_labels(p: Pipeline, labels, opts: SampleOptions):
    """Refuse labels the pipeline cannot serve, in one line (the guidance itself: resolve.check_guidance)."""
    n = p.num_classes
    if n is not None and any(not 0 <= int(y) < n for y in labels):
        raise GuidedError(f"class {max(labels)} is outside the model's {n} classes (0..{n - 1})")
    mapping = classifier_indices(p) if opts.scale and p.classifier is not None else None
    if mapping is not None:
        missing = [int(y) for y in labels if mapping[int(y)] < 0]
        if missing:
            y = missing[0]
            raise GuidedError(f"class {p.label_map.keys[y]} ({p.label_map.names[y]}, the model's index {y}) is not among "
                              f"the classifier's {len(p.classifier_labels)} classes: guide with a classifier of it")
        return
    k = p.classifier.cfg.num_classes if opts.scale and p.classifier is not None else None
    if k is not None and any(not 0 <= int(y) < k for y in labels):
        raise GuidedError(f"class {max(labels)} is outside the classifier's {k} classes (0..{k - 1}): guide with a "
                          f"classifier of the model's classes")


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
            mapping = classifier_indices(p)
            kw["labels"] = None if mapping is None else torch.tensor(mapping)
        if m.term == "x0_classifier":
            net = _clean_classifier(net)
            if net is not None and not p.space.bounded:
                net = _through_decoder(net, p.space)
        terms.append(Term(m.term, getattr(opts, m.scale), net, getattr(opts, m.interval), **kw))
    for name, t in opts.terms.items():  # registered terms (guided.guidance.terms.register_term), by name
        terms.append(Term(name, float(t["scale"]), p.guides.get(name), t.get("interval"), t.get("schedule", "constant")))
    null = p.model.num_classes if getattr(p.model.cfg, "null_class", False) else None
    return Guidance(terms, p.score_model.sigma_of, null_label=null)


def _clean_classifier(net):
    """classify(x0) -> logits of a clean-image classifier: one of ours sees timestep 0, any other module x0 alone."""
    if net is None or not hasattr(net, "cfg"):
        return net
    return lambda x0: net(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device))


def _through_decoder(classify, space):
    """classify(D(z0)): a pixel classifier on the decoded x0 estimate of a latent model, so the x0-classifier's
    gradient grad_z log p(y | D(x0_hat(z_t))) runs back through the VAE decoder and the denoiser (EluCD's
    term, Ma et al. 2023, in a latent space); the decoder's activations are held for one backward pass."""
    return lambda z0: classify(space.decode(z0).to(z0.dtype))


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


def guided_denoiser(p: Pipeline, y: torch.Tensor, opts: SampleOptions, preview=None) -> GuidedDenoiser:
    """The one guided denoiser of the pipeline for labels y under resolved options."""
    output, grad = guided_functions(p, y, opts)
    return GuidedDenoiser(p.score_model, output, grad, clip=opts.clip, percentile=opts.percentile,
                          clip_guided=opts.clip_guided, preview=preview)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def sample_batch(p: Pipeline, labels, seeds, opts: SampleOptions, *, device="cpu", progress=False,
                 init=None, x_T: Optional[torch.Tensor] = None, preview=None) -> torch.Tensor:
    """Draw len(labels) samples (images in the model's data range); sample i uses the generator seeded with
    seeds[i]. The options are resolved first (guided/generation/resolve.py). `init` (SDEdit): a
    guided.samplers.sdedit.SDEdit, or a dict with `image` [C,H,W] in [-1, 1], `t0` in (0, 1] and an
    optional `mask` [1,H,W] (1 = may change). `x_T`: start from this noise instead of drawing it.
    `preview(done, x0)`, if given, is called along the way with the share of the reverse process done,
    in (0, 1], and the current denoised prediction (the x0 estimate)."""
    sdedit = SDEdit.of(init)
    opts = resolve(p, opts, editing=sdedit is not None)
    spec, model, noise = SAMPLERS[opts.sampler], p.score_model, SampleNoise(seeds, torch.device(device))
    y = torch.as_tensor(list(labels), device=noise.device, dtype=torch.long)
    den = guided_denoiser(p, y, opts, preview)
    levels, after = make_levels(model, spec.levels, opts.steps, spec.name), None
    if sdedit is not None:
        x, levels, after = sdedit.start(levels, model, noise, p.shape(), x_T)
    else:
        x = model.prior(noise, p.shape()) if x_T is None else x_T.to(noise.device)
    with torch.no_grad(), autocast(noise.device, opts.precision):  # guidance takes its own gradients
        out = spec.fn(den, x, levels, noise=noise, after_step=after, callback=preview, progress=progress,
                      **opts.settings)
    return model.space.finish(out)
