"""Options shared by the sampling programs (sample_guided.py, guided.cli.sweep, guided.cli.demo): their
argparse groups, the value parsers, and the translation of parsed options into the library's typed
arguments (`load_pipeline(...)` keywords, `SampleOptions`). The guidance flags derive from
guided.generation.options.METHODS, the sampler choices from the sampler registry.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import fields

from guided.errors import GuidedError
from guided.generation.loading import SHIPPED_MODELS, classifier_spec, guide_spec
from guided.generation.options import METHODS, SampleOptions
from guided.guidance.terms import SCHEDULES
from guided.samplers.fewstep import FUNCTIONS as FEWSTEP, settings as fewstep_settings
from guided.samplers.registry import SAMPLERS, clip_guided_samplers

LOADER_HELP = {
    "autoguide": "autoguidance's weaker model: 'weak' / 'early' (shipped) or a run dir or checkpoint with the main "
                 "model's conditioning (default for shipped models: weak)",
    "x0_classifier": "a classifier of clean images for guidance on the denoised x0 (default for shipped models: "
                     "clean_classifier)",
}


def _number(kind, low=None, low_open=False):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise TypeError from None
        if isinstance(v, float) and not math.isfinite(v):
            raise TypeError
        if low is not None and (v < low or (low_open and v == low)):
            raise TypeError
        return v
    positive = low_open or (low is not None and low > 0)
    parse.__name__ = ("positive " if positive else "non-negative " if low is not None else "") + kind.__name__
    return parse


def _scales(text):
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise TypeError from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise TypeError
    return values


_scales.__name__ = "comma list of non-negative numbers"


def add_model_args(p):
    src = p.add_argument_group("models")
    src.add_argument("--model", default="cond",
                     help="score model: 'cond' / 'uncond' / 'ncsn' (shipped digits models), a run dir or checkpoint of "
                          "train_diffusion.py, an official ADM checkpoint (the released file names need no "
                          "--adm-flags), or a diffusers UNet2DModel folder (README: Guiding a diffusers model)")
    src.add_argument("--scheduler", default=None,
                     help="a diffusers model's scheduler_config.json, for a unet folder without its pipeline's "
                          "scheduler/ (default: the pipeline folder's)")
    src.add_argument("--classifier", default=None,
                     help="noise-aware classifier: a train_classifier.py run dir or checkpoint, an official one (the "
                          "released file names need no --classifier-flags), or 'none'; default: the shipped digits "
                          "classifier for shipped models")
    src.add_argument("--adm-flags", default=None, help="the published flag string of an official ADM model "
                     "(default for a released file name: its published flags)")
    src.add_argument("--classifier-flags", default=None, help="the published flag string of an official classifier "
                     "(default for a released file name: its published flags)")
    src.add_argument("--class", dest="classes", action="append", default=None,
                     help="labels: an index, a comma list, an ImageNet wnid or a class name; repeat to add more "
                          "(--class 3 --class 5); default: every class")


def add_sampler_args(p):
    s = p.add_argument_group("sampler")
    s.add_argument("--sampler", choices=tuple(SAMPLERS), default=None,
                   help="the reverse-process solver (default: ddpm; for the shipped cond and uncond models asked for "
                        "no --steps either, dpm++2m-sde on karras20)")
    s.add_argument("--steps", default=None, help="respacing: a count, section counts (10,15,20), ddimN, quadN, on the "
                                                 "noise level karrasN (EDM's rho = 7) or logsnrN (uniform in log-SNR), "
                                                 "or leadingN / trailingN / linspaceN (diffusers' spacings; a diffusers "
                                                 "model's count takes its scheduler's) (default: 100; the ode and "
                                                 "langevin samplers choose their own; karras20 with the shipped "
                                                 "models' default sampler)")
    s.add_argument("--sampler-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="a setting of the few-step samplers (dpm++2m-sde, dpm++3m, edm): threshold=dynamic|static|"
                        "none, percentile, eta, churn, s_noise, s_tmin, s_tmax; repeat for more")
    s.add_argument("--eta", type=_number(float, 0.0), default=0.0, help="DDIM noise (0 = deterministic)")
    s.add_argument("--no-clip", action="store_true", help="do not clip the x0 prediction to [-1, 1]")
    s.add_argument("--clip-guided", action=argparse.BooleanOptionalAction, default=None,
                   help="also clip x0 where the paper's code does not: the guided x0 of ddim and dpm++, the x0 "
                        "behind the eps of pc and ode (default: on for the shipped cond and uncond models, off "
                        "for every other model)")
    s.add_argument("--num-samples", type=_number(int, 1), default=100, help="how many samples to draw")
    s.add_argument("--class-sampling", choices=("balanced", "random"), default="balanced",
                   help="balanced: sample i asks for class i mod K; random: classes drawn uniformly at random, as the "
                        "paper's sampling scripts")
    s.add_argument("--batch-size", type=_number(int, 1), default=100, help="samples drawn at once (per process)")
    s.add_argument("--seed", type=_number(int, 0), default=0, help="sample i uses seed + i")
    s.add_argument("--device", default=None, help="default: cuda if present, else mps, else cpu")
    s.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    s.add_argument("--channels-last", action="store_true", help="speed: NHWC memory layout")
    s.add_argument("--compile", action="store_true", help="speed: torch.compile the networks")
    s.add_argument("--cuda-graphs", action="store_true", help="speed: compile and replay each step as a CUDA graph")


def interval(text):
    """'LO,HI' or 'LO:HI' (HI may be inf) -> (lo, hi): a term's active range of noise levels sigma."""
    parts = text.replace(":", ",").split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise TypeError from None
    if not (0 <= lo <= hi) or math.isnan(hi):
        raise TypeError
    return lo, hi


interval.__name__ = "noise-level interval LO,HI (0 <= LO <= HI, HI may be inf)"


CLASSIFIER_DEFAULT = 1.0  # --scale when nothing else is asked and the model has a noise-aware classifier
SCALE_HELP = (f" (default: {CLASSIFIER_DEFAULT:g} where the model has a noise-aware classifier and no other guidance "
              "method is named, else 0)")


def add_guidance_args(p):
    """The guidance layer's terms (guided/guidance), one set of flags per METHODS entry: its scale, its
    sigma interval, its schedule and temperature where it has them, the network it loads. --scale's
    default is resolved after parsing by `resolve_scale` (the same rule in every program)."""
    g = p.add_argument_group("guidance (terms compose: their corrections add up; README 'Guidance')")
    for m in METHODS:
        default = None if m.term == "classifier" else m.off
        g.add_argument(m.flag, type=_number(float, 0.0), default=default,
                       help=m.help + (SCALE_HELP if m.term == "classifier" else ""))
        g.add_argument(m.flag.replace("scale", "interval"), type=interval, default=None,
                       help=f"sigma range where {m.demo} guidance acts, e.g. 0.3,5 (default: every level); "
                            "sigma = sqrt((1 - abar) / abar) for VP models")
        if m.schedule:
            g.add_argument(m.flag.replace("scale", "schedule"), choices=tuple(SCHEDULES), default="constant",
                           help=f"the weight of {m.demo} guidance over sigma: constant, or larger where the "
                                "images are noisy or clean (guided.guidance.terms.SCHEDULES)")
        if m.temperature:
            g.add_argument(m.flag.replace("scale", "temperature"), type=_number(float, 0.0, low_open=True),
                           default=1.0, help="the x0 classifier's logits are divided by this")
        if m.loader:
            g.add_argument("--" + m.loader.replace("_", "-"), default=None, help=LOADER_HELP[m.loader])
    g.add_argument("--no-calibration", action="store_true",
                   help="ignore the classifier's fitted temperatures (default: use them when it has them)")
    g.add_argument("--ddpm-form", choices=("mean", "score"), default="mean",
                   help="DDPM: the paper's mean shift (Algorithm 1) or the score correction (default: mean)")
    return g


def named_methods(args) -> list:
    """The guidance methods other than the noise-aware classifier that the command line turns on."""
    return [m for m in METHODS if m.term != "classifier" and getattr(args, m.scale) != m.off]


def resolve_scale(args) -> float:
    """The one rule for --scale's default, shared by sample_guided.py, the sweep and the demo: a user who
    names a guidance method gets that method alone unless they ask for more (--scale 0 when another
    method is named), and a model without a noise-aware classifier samples unguided; otherwise the
    model's classifier guides at CLASSIFIER_DEFAULT. Sets and returns args.scale."""
    if args.scale is None:
        has_classifier = classifier_spec(args.model, args.classifier) != "none"
        args.scale = CLASSIFIER_DEFAULT if has_classifier and not named_methods(args) else 0.0
    return args.scale


def resolve_sampler(args) -> str:
    """The one rule for --sampler's default, shared by sample_guided.py, the sweep and the demo: a shipped
    model with a few-step default (SHIPPED_MODELS "sampler", "steps"), asked for neither --sampler nor
    --steps and not editing an image, samples with it; every other run with the paper's ddpm. Sets
    args.sampler (and then args.steps) and returns the sampler."""
    if args.sampler is None:
        shipped = SHIPPED_MODELS.get(args.model, {})
        if "sampler" in shipped and args.steps is None and not getattr(args, "init_image", None):
            args.sampler, args.steps = shipped["sampler"], shipped["steps"]
        else:
            args.sampler = "ddpm"
    return args.sampler


def classifier_in_use(args) -> bool:
    """Whether the noise-aware classifier guides at some scale of the run, or was named on the command line."""
    return args.classifier is not None or any(s > 0 for s in getattr(args, "scales", None) or [args.scale])


ADAPTIVE = {name: s.adaptive for name, s in SAMPLERS.items() if s.adaptive}


def options(args, scale, **override) -> SampleOptions:
    """The SampleOptions of parsed sampling options, with the classifier scale `scale`; `override` may
    replace the parsed `sampler` and `steps` (the demo page's fields)."""
    sampler, given = override.get("sampler", args.sampler), override.get("steps", args.steps)
    steps = given or "100"
    if sampler in ADAPTIVE and not getattr(args, "init_image", None):  # SDEdit runs its own steps
        if given is not None:
            raise GuidedError(f"--sampler {sampler} chooses its own steps ({ADAPTIVE[sampler]}); "
                              f"drop --steps {given}, or pick ddpm, ddim, dpm++ or pc for a fixed count")
        steps = ADAPTIVE[sampler]
    parsed = {f.name: getattr(args, f.name) for f in fields(SampleOptions) if hasattr(args, f.name)}
    return SampleOptions(**{**parsed, "sampler": sampler, "steps": steps, "scale": scale,
                            "clip_denoised": not args.no_clip, "clip_guided": clip_guided(args, sampler),
                            "calibration": not args.no_calibration, "extra": sampler_settings(args, sampler)})


def sampler_settings(args, sampler: str) -> dict:
    """--sampler-arg KEY=VALUE ... as SampleOptions.extra, for the few-step samplers only."""
    given = getattr(args, "sampler_arg", None) or []
    if given and sampler not in FEWSTEP:
        raise GuidedError(f"--sampler-arg is for the few-step samplers ({', '.join(FEWSTEP)}), not {sampler}")
    pairs = [g.split("=", 1) for g in given]
    if any(len(p) != 2 for p in pairs):
        raise GuidedError(f"--sampler-arg takes KEY=VALUE, not {next(g for g in given if '=' not in g)!r}")
    typed = fewstep_settings({k.strip(): v.strip() for k, v in pairs})
    shipped = SHIPPED_MODELS.get(args.model, {}).get("threshold")
    if sampler in FEWSTEP and shipped and "threshold" not in typed:
        typed["threshold"] = shipped
    return typed


def clip_guided(args, sampler: str) -> bool:
    """--clip-guided as given, else the shipped model's default; off (the paper's arithmetic) for
    every model not in SHIPPED_MODELS and for the samplers it does not change."""
    changed, applies = clip_guided_samplers(), SAMPLERS[sampler].clips(getattr(args, "ddpm_form", "mean"))
    if args.clip_guided is None:
        default = SHIPPED_MODELS.get(args.model, {}).get("clip_guided", False)
        return default and applies and not args.no_clip
    if args.clip_guided and args.no_clip:
        raise GuidedError("--clip-guided clips x0 to [-1, 1]; it cannot go with --no-clip")
    if args.clip_guided and not applies:
        raise GuidedError(f"--clip-guided does not change the {sampler} sampler; it applies to {', '.join(changed)}")
    return args.clip_guided


def guides(args, optional=()) -> dict:
    """load_pipeline's guide keywords: the guide networks the active terms need, and `optional` ones to
    load where a network is named or shipped (the demo: all; a sweep: the swept term's)."""
    active = [m.loader for m in METHODS if m.loader and getattr(args, m.scale) != m.off]
    return dict(autoguide=args.autoguide, x0_classifier=args.x0_classifier, guides=tuple(active),
                optional_guides=tuple(optional))


def pipeline_keywords(args, device, optional=()) -> dict:
    """Every keyword of guided.generation.load_pipeline from parsed options."""
    return dict(model=args.model, classifier=args.classifier, adm_flags=args.adm_flags, scheduler=args.scheduler,
                classifier_flags=args.classifier_flags, device=device, channels_last=args.channels_last,
                compile=args.compile, cuda_graphs=args.cuda_graphs, **guides(args, optional))


def guide_settings(args) -> dict:
    """The classifier, autoguidance and x0-classifier networks used, for settings.json."""
    return {"classifier": classifier_spec(args.model, args.classifier),
            **{m.loader: guide_spec(args.model, m.loader, getattr(args, m.loader)) if getattr(args, m.scale) != m.off
               else None for m in METHODS if m.loader}}
