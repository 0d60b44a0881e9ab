"""Options shared by the sampling programs (sample_guided.py, guided.cli.sweep, guided.cli.demo): their
argparse groups, the value parsers, and the translation of parsed options into the library's typed
arguments (`load_pipeline(...)` keywords, `SampleOptions`). The guidance flags derive from
guided.generation.options.METHODS, the sampler choices from the sampler registry.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import fields

from guided.diffusion.space import CLIPS
from guided.errors import GuidedError
from guided.generation.options import METHODS, SampleOptions
from guided.generation.resolve import CLASSIFIER_DEFAULT
from guided.guidance.terms import SCHEDULES, check_interval
from guided.samplers.registry import SAMPLERS

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
                          "--adm-flags), a diffusers UNet2DModel folder, or a latent one: a DiTPipeline folder or a UNet2DModel with "
                          "its VAE (docs: Models from elsewhere)")
    src.add_argument("--scheduler", default=None,
                     help="a diffusers model's scheduler_config.json, for a unet folder without its pipeline's "
                          "scheduler/ (default: the pipeline folder's)")
    src.add_argument("--vae", default=None,
                     help="the AutoencoderKL folder of a latent diffusers model (a DiT or UNet2DModel on latents) whose "
                          "folder holds no vae/ (default: the pipeline folder's)")
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
                   help="the reverse-process solver (default: the model's own, set in its config's sampling node: "
                        "dpm++2m-sde on karras20 for the shipped cond and uncond models asked for no --steps either; "
                        "else ddpm for eps models, langevin for NCSN models)")
    s.add_argument("--steps", default=None, help="respacing: a count, section counts (10,15,20), ddimN, quadN, on the "
                                                 "noise level karrasN (EDM's rho = 7) or logsnrN (uniform in log-SNR), "
                                                 "or leadingN / trailingN / linspaceN (diffusers' spacings; a diffusers "
                                                 "model's count takes its scheduler's) (default: 100; the ode and "
                                                 "langevin samplers choose their own; karras20 with the shipped "
                                                 "models' default sampler)")
    s.add_argument("--sampler-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="a setting the sampler declares (eta of ddim and dpm++2m-sde; churn, s_noise, s_tmin, s_tmax "
                        "of edm; predictor, corrector, snr, n_corrector of pc; rtol, atol of ode; n_steps_each, step_lr "
                        "of langevin); repeat for more. threshold=KIND and percentile=P are --clip and "
                        "--clip-percentile")
    s.add_argument("--eta", type=_number(float, 0.0), default=None,
                   help="the sampler's noise: DDIM's eta (default 0), DPM-Solver++(2M) SDE's (default 1)")
    s.add_argument("--clip", choices=CLIPS, default=None,
                   help="x0 clipping, where the data has a range: static (clamp), dynamic (Saharia et al.'s "
                        "threshold) or none (default: the model's, else static; dynamic for the few-step samplers)")
    s.add_argument("--clip-percentile", dest="percentile", type=_number(float, 0.0, low_open=True), default=0.995,
                   help="the dynamic threshold's quantile of |x0|, a share in (0, 1] (default: 0.995)")
    s.add_argument("--no-clip", action="store_true", help="do not clip the x0 prediction (= --clip none)")
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
        return check_interval(*parts) if len(parts) == 2 else check_interval(None, None)
    except (ValueError, TypeError, GuidedError):
        raise TypeError from None


interval.__name__ = "noise-level interval LO,HI (0 <= LO <= HI, HI may be inf)"


SCALE_HELP = (f" (default: {CLASSIFIER_DEFAULT:g} where the model has a noise-aware classifier and no other guidance "
              "method is named, else 0)")


def add_guidance_args(p):
    """The guidance layer's terms (guided/guidance), one set of flags per METHODS entry: its scale, its
    sigma interval, its schedule and temperature where it has them, the network it loads. --scale's
    default is decided after loading by guided.generation.resolve (the same rule in every program)."""
    g = p.add_argument_group("guidance (terms compose: their corrections add up; docs: Guidance)")
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
    g.add_argument("--guide", action="append", default=None, metavar="NAME=SCALE",
                   help="a guidance term registered from outside the package (guided.guidance.terms.register_term) "
                        "at this scale; repeat for more (docs: Extending guided)")
    g.add_argument("--guide-interval", action="append", default=None, metavar="NAME=LO,HI",
                   help="the sigma range where a --guide term acts (default: every level)")
    g.add_argument("--guide-network", action="append", default=None, metavar="NAME=PATH",
                   help="the network of a --guide term, loaded by the term's own loader")
    g.add_argument("--no-calibration", action="store_true",
                   help="ignore the classifier's fitted temperatures (default: use them when it has them)")
    g.add_argument("--ddpm-form", choices=("mean", "score"), default=None,
                   help="DDPM: the paper's mean shift (Algorithm 1) or the score correction (default: mean)")
    return g


def options(args, scale, **override) -> SampleOptions:
    """The request of parsed sampling options, with the classifier scale `scale` (None: decided after
    loading); what was not asked stays None and is decided once, after loading, by
    guided.generation.resolve.resolve. `override` may replace the parsed `sampler` and `steps` (the demo's
    fields). Pipeline-independent contradictions are refused here, before anything is loaded."""
    sampler, steps = override.get("sampler", args.sampler), override.get("steps", args.steps)
    parsed = {f.name: getattr(args, f.name) for f in fields(SampleOptions) if hasattr(args, f.name)}
    given = sampler_settings(args)
    clip = "none" if args.no_clip else args.clip
    if args.no_clip and args.clip not in (None, "none"):
        raise GuidedError(f"--no-clip is --clip none; it cannot go with --clip {args.clip}")
    if "threshold" in given and clip is not None and given["threshold"] != clip:
        said = "--no-clip" if args.no_clip else f"--clip {args.clip}"
        raise GuidedError(f"--sampler-arg threshold={given['threshold']} and {said} contradict each other: give one")
    clip = given.pop("threshold", clip)
    try:
        percentile = float(given.pop("percentile", args.percentile))
    except ValueError:
        raise GuidedError("--sampler-arg percentile takes a number, a share in (0, 1] (99.5% is 0.995)") from None
    if clip not in (None, *CLIPS):
        raise GuidedError(f"threshold must be one of {', '.join(CLIPS)}, not {clip!r}")
    opts = SampleOptions(**{**parsed, "sampler": sampler, "steps": steps, "scale": scale, "clip": clip,
                            "percentile": percentile, "calibration": not args.no_calibration, "settings": given,
                            "terms": registered_terms(args)})
    if sampler is not None:  # a setting the named sampler does not take is refused before loading
        SAMPLERS[sampler].typed(given)
    return opts


def _pairs(given, flag: str) -> dict:
    pairs = [g.split("=", 1) for g in given or []]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise GuidedError(f"{flag} takes NAME=VALUE, not {next(g for g, p in zip(given, pairs) if len(p) != 2 or not p[0].strip())!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def registered_terms(args) -> dict:
    """--guide NAME=SCALE and --guide-interval NAME=LO,HI as SampleOptions.terms (checked after loading)."""
    scales, intervals = _pairs(getattr(args, "guide", None), "--guide"), _pairs(getattr(args, "guide_interval", None),
                                                                             "--guide-interval")
    terms = {}
    for name, text in scales.items():
        try:
            scale = float(text)
        except ValueError:
            raise GuidedError(f"--guide {name}={text}: the scale must be a number") from None
        try:
            span = interval(intervals[name]) if name in intervals else None
        except TypeError:
            raise GuidedError(f"--guide-interval {name}={intervals[name]}: give LO,HI with 0 <= LO <= HI") from None
        terms[name] = {"scale": scale, "interval": span, "schedule": "constant"}
    stray = sorted(set(intervals) - set(scales))
    if stray:
        raise GuidedError(f"--guide-interval {stray[0]}=... goes with --guide {stray[0]}=SCALE")
    return terms


def sampler_settings(args) -> dict:
    """--sampler-arg KEY=VALUE ..., --eta and --ddpm-form as the sampler's settings (typed after loading)."""
    given = getattr(args, "sampler_arg", None) or []
    pairs = [g.split("=", 1) for g in given]
    if any(len(p) != 2 for p in pairs):
        raise GuidedError(f"--sampler-arg takes KEY=VALUE, not {next(g for g in given if '=' not in g)!r}")
    out = {k.strip(): v.strip() for k, v in pairs}
    for flag, key in (("eta", "eta"), ("ddpm_form", "ddpm_form")):
        value = getattr(args, flag, None)
        if value is not None:
            if key in out:
                raise GuidedError(f"--{flag.replace('_', '-')} and --sampler-arg {key}= say the same thing: give one")
            out[key] = value
    return out


def guides(args, optional=()) -> dict:
    """load_pipeline's guide keywords: the guide networks the active terms need, and `optional` ones to
    load where a network is named or shipped (the demo: all; a sweep: the swept term's)."""
    active = [m.loader for m in METHODS if m.loader and getattr(args, m.scale) != m.off]
    return dict(autoguide=args.autoguide, x0_classifier=args.x0_classifier, guides=tuple(active),
                optional_guides=tuple(optional))


def pipeline_keywords(args, device, optional=()) -> dict:
    """Every keyword of guided.generation.load_pipeline from parsed options."""
    return dict(model=args.model, classifier=args.classifier, adm_flags=args.adm_flags, scheduler=args.scheduler,
                vae=getattr(args, "vae", None),
                classifier_flags=args.classifier_flags, device=device, channels_last=args.channels_last,
                compile=args.compile, cuda_graphs=args.cuda_graphs, **guides(args, optional),
                term_networks=_pairs(getattr(args, "guide_network", None), "--guide-network"))


def guide_settings(args, pipeline, opts: SampleOptions) -> dict:
    """The classifier, autoguidance and x0-classifier networks that guide (resolved options), for settings.json."""
    named = {"classifier": pipeline.classifier_name if opts.scale else "none"}
    for m in METHODS:
        if m.loader:
            on = getattr(opts, m.scale) != m.off
            named[m.loader] = (getattr(args, m.loader) or getattr(pipeline.defaults, m.loader)) if on else None
    networks = _pairs(getattr(args, "guide_network", None), "--guide-network")
    if networks:
        named["guide_networks"] = networks
    return named
