"""The sampling policy, decided once, after the model is loaded.

`resolve(pipeline, opts)` takes what was asked (a `SampleOptions` whose None fields were not asked for)
and the loaded pipeline, and returns the options that will run, every value checked once against what
it is used with:
- the sampler: as asked, else the model's own default (its config's `sampling` node, when neither a
  sampler nor steps were asked and no image is edited), else the registry's default for the model's
  kind (ddpm for eps networks, langevin for NCSN ladders); refused where the model's kind cannot use it;
- the steps: as asked (refused for a sampler that picks its own), else the model's default with its
  sampler, else the registry's; made into levels once here, so a spec the sampler cannot take is
  refused before any file is written;
- the clip: as asked, else the model's default, else the sampler's; "none" in a space without a range;
  `clip_guided` as asked, else the model's default where it changes the sampler;
- the sampler's own settings, as asked, else the model's (a diffusers folder's DDIM takes the network's eps,
  as DDIMScheduler.step does), else the sampler's; typed and range-checked against what it declares (a
  setting it does not take is refused, not recorded); SDEdit on SDE time runs the predictor alone ([SDEdit] Sec. 3);
- the noise-aware classifier's scale: as asked, else 1 where the pipeline has a classifier and no other
  guidance method is on, else 0; every guidance term checked against the network it needs.
The command line, the sweep, the demo and the Python API (`sample_batch`) all go through it.
"""
from __future__ import annotations

import math
from dataclasses import replace

from guided.diffusion.models import noise_process, same_process
from guided.diffusion.space import CLIPS
from guided.errors import GuidedError
from guided.generation.options import METHODS, SampleOptions
from guided.guidance.terms import KINDS
from guided.samplers.levels import make_levels
from guided.samplers.registry import DEFAULT, DEFAULT_STEPS, clip_guided_samplers, sampler_for

BUILTIN = tuple(m.term for m in METHODS)  # the terms with flags of their own (--scale, --cfg-scale, ...)
CLASSIFIER_DEFAULT = 1.0  # the classifier's scale when nothing else is asked and the pipeline has one


def resolve(p, opts: SampleOptions, *, editing: bool = False, say=None) -> SampleOptions:
    """The options that run: see the module docstring. `editing`: an SDEdit run; `say(line)` is told of a
    choice a user may not expect (the command line prints it)."""
    model, d = p.score_model, p.defaults
    sampler, steps = opts.sampler, opts.steps
    if sampler is None:
        if d.sampler and steps is None and not editing:
            sampler, steps = d.sampler, d.steps
        else:
            sampler = DEFAULT[model.kind]
            if d.sampler and steps is not None and d.sampler != sampler and say is not None:
                say(f"note: --steps {steps} without --sampler samples with {sampler}, the registry's default; this "
                    f"model's own sampler ({d.sampler}) goes with its own steps ({d.steps}): name --sampler to choose")
    spec = sampler_for(sampler, model.kind)
    if editing and not spec.fixed_steps:
        raise GuidedError(f"SDEdit runs over fixed steps: the {sampler} sampler chooses its own; use ddpm, ddim, "
                          "dpm++, dpm++2m-sde, dpm++3m, edm or pc")
    if spec.fixed_steps:
        steps = str(steps if steps is not None else DEFAULT_STEPS)
        make_levels(model, spec.levels, steps, sampler)  # a spec it cannot take is refused here
    elif steps is not None and steps != spec.adaptive:
        raise GuidedError(f"--sampler {sampler} chooses its own steps ({spec.adaptive}); drop --steps {steps}, "
                          f"or pick a sampler with a fixed count")
    else:
        steps = spec.adaptive
    settings = spec.typed({**getattr(p, "sampler_defaults", {}).get(sampler, {}), **opts.settings})
    if editing and spec.levels == "sde" and "corrector" not in opts.settings:
        settings["corrector"] = "none"
    clip, clip_guided = _clip(model, spec, d, opts, settings)
    scale = _scale(p, opts)
    out = replace(opts, sampler=sampler, steps=str(steps), clip=clip, clip_guided=clip_guided, settings=settings,
                  scale=scale)
    check_guidance(p, out)
    return out


def _clip(model, spec, d, opts, settings) -> tuple[str, bool]:
    """(clip kind, clip_guided): as asked, else the model's default, else the sampler's; no clip without a range."""
    clip = opts.clip or d.clip or spec.default_clip
    if clip not in CLIPS:
        raise GuidedError(f"clip must be one of {', '.join(CLIPS)}, not {clip!r}")
    if not 0 < opts.percentile <= 1:
        raise GuidedError(f"the dynamic threshold's percentile is a share in (0, 1] (99.5% is 0.995), "
                          f"not {opts.percentile}")
    if not model.space.bounded:
        if opts.clip not in (None, "none") or opts.clip_guided:
            raise GuidedError(f"the {model.space.name} space has no range to clip x0 to: drop --clip / --clip-guided")
        return "none", False
    applies = spec.clips(settings.get("ddpm_form", "mean"))
    if opts.clip_guided is None:
        return clip, bool(d.clip_guided and applies and clip != "none")
    if opts.clip_guided and clip == "none":
        raise GuidedError("--clip-guided clips x0 to the data range; it cannot go with --no-clip (--clip none)")
    if opts.clip_guided and not applies:
        raise GuidedError(f"--clip-guided does not change the {spec.name} sampler; it applies to "
                          f"{', '.join(clip_guided_samplers())}")
    return clip, opts.clip_guided


def others_on(opts: SampleOptions) -> bool:
    """Whether a guidance method other than the noise-aware classifier is on."""
    return any(getattr(opts, m.scale) != m.off for m in METHODS if m.term != "classifier") or any(
        t.get("scale") != (KINDS[n].off if n in KINDS else 0.0) for n, t in opts.terms.items())


def _scale(p, opts: SampleOptions) -> float:
    """The one rule for the classifier's default scale: a user who names another guidance method gets that
    method alone unless they ask for more, and a pipeline without a classifier samples unguided."""
    if opts.scale is not None:
        return float(opts.scale)
    return CLASSIFIER_DEFAULT if p.classifier is not None and not others_on(opts) else 0.0


def check_guidance(p, opts: SampleOptions) -> None:
    """Refuse guidance the pipeline cannot serve, in one line."""
    for m in METHODS:
        v = getattr(opts, m.scale)
        if v is None or v != v or v in (float("inf"), float("-inf")) or v < 0:
            raise GuidedError(f"{m.flag} must be a finite non-negative number, not {v}")
    n = p.num_classes
    if n is None and (opts.scale or opts.cfg_scale != 1.0):
        raise GuidedError("guidance needs a class-conditional model or a classifier; neither was given")
    if opts.scale and p.classifier is None:
        raise GuidedError("--scale needs a noise-aware classifier (--classifier)")
    if opts.scale and p.classifier_process is not None:
        why = same_process(p.classifier_process, noise_process(p.score_model))
        if why is not None:
            raise GuidedError(f"the classifier cannot guide this model: {why}; train a classifier on the model's "
                              f"noise process (train_classifier.py with the model's diffusion config)")
    if opts.cfg_scale != 1.0 and not (getattr(p.model.cfg, "null_class", False) and p.conditional):
        raise GuidedError("--cfg-scale needs a class-conditional model trained with label dropout (model.null_class)")
    if opts.autoguide_scale != 1.0 and p.weak_model is None:
        raise GuidedError("--autoguide-scale needs a weaker model (--autoguide)")
    if opts.x0_scale and p.x0_classifier is None:
        raise GuidedError("--x0-scale needs a classifier of clean images (--x0-classifier)")
    if opts.x0_scale and p.score_model.kind != "eps":
        raise GuidedError("x0-classifier guidance needs a denoiser (an eps-prediction model)")
    for name, t in opts.terms.items():
        kind = KINDS.get(name)
        if kind is None or name in BUILTIN:
            raise GuidedError(f"--guide {name}: no registered guidance term of that name (registered from outside "
                              f"the package: {', '.join(k for k in KINDS if k not in BUILTIN) or 'none'})")
        v = t.get("scale")
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise GuidedError(f"--guide {name}: the scale must be a finite non-negative number, not {v}")
        if kind.needs_network and v != kind.off and name not in p.guides:
            raise GuidedError(f"--guide {name} needs its network: --guide-network {name}=PATH")
