"""sample_guided.py: class-conditional samples with classifier guidance.

    python sample_guided.py --class 3 --scale 4 --num-samples 100 --out out/
    python sample_guided.py --model uncond --class 7 --scales 0,1,2,4,10 --out sweep/
    python sample_guided.py --model 256x256_diffusion.pt --classifier 256x256_classifier.pt --class 207 --scale 1

With no --model, the digits models shipped in guided/assets/digits are used. The nine released
ADM checkpoints are built from their published flags by file name; other ADM checkpoints take
--adm-flags / --classifier-flags.
Runs under `accelerate launch` too: each process draws its share of batches.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from guided.networks import adm
from guided.errors import GuidedError
from guided.speed import speed_up
from guided.generation.generate import Pipeline, SampleOptions, generate
from guided.locks import check_world_size
from guided.cli import Parser, run_cli

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "digits"
# The shipped digits models (guided/assets/digits/<file>.pt) and their sampling defaults.
# `uncond` is the null class of the label-dropout `cond` network (README "Digits models" measures it
# against a separate unconditional model). The cosine-schedule eps models clip x0 again
# (--clip-guided): without it their guided ddim / dpm++ and their pc / ode samples saturate
# (README, "Official checkpoints"); every other model samples with the paper's arithmetic.
_DIGITS = {"file": "cond", "clip_guided": True, "classifier": "classifier", "autoguide": "weak",
           "x0_classifier": "clean_classifier"}
SHIPPED_MODELS = {"cond": _DIGITS, "uncond": {**_DIGITS, "unconditional": True},
                  "ncsn": {"file": "ncsn", "classifier": "ncsn_classifier"}}
SHIPPED_NETWORKS = ("classifier", "ncsn_classifier", "clean_classifier", "weak", "early")  # by name, as --classifier etc.
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++", "pc", "ode", "langevin")
CLIP_GUIDED_SAMPLERS = ("ddim", "dpm++", "pc", "ode")  # the samplers --clip-guided changes


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
                          "train_diffusion.py, or an official ADM checkpoint (the released file names need no "
                          "--adm-flags)")
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
    s.add_argument("--cfg-scale", type=_number(float, 0.0), default=1.0,
                   help="classifier-free guidance scale (1 = off; needs a model trained with label dropout)")
    s.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm", help="the reverse-process solver")
    s.add_argument("--steps", default=None, help="respacing: a count, section counts (10,15,20), ddimN or quadN "
                                                 "(default: 100; the ode and langevin samplers choose their own)")
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


def add_guidance_args(p, scale_default=1.0):
    """The guidance layer's terms (guided/guidance.py): every one with a scale and an active sigma interval."""
    from guided.guidance.terms import SCHEDULES

    g = p.add_argument_group("guidance (terms compose: their corrections add up; README 'Guidance')")
    g.add_argument("--scale", type=_number(float, 0.0), default=scale_default,
                   help="noise-aware classifier guidance scale s (0 = none)")
    g.add_argument("--interval", type=interval, default=None,
                   help="sigma range where the classifier guides, e.g. 0.3,5 (default: every level); "
                        "sigma = sqrt((1 - abar) / abar) for VP models")
    g.add_argument("--schedule", choices=tuple(SCHEDULES), default="constant",
                   help="the classifier's weight over sigma (default: constant)")
    g.add_argument("--no-calibration", action="store_true",
                   help="ignore the classifier's fitted temperatures (default: use them when it has them)")
    g.add_argument("--ddpm-form", choices=("mean", "score"), default="mean",
                   help="DDPM: the paper's mean shift (Algorithm 1) or the score correction (default: mean)")
    g.add_argument("--cfg-interval", type=interval, default=None, help="sigma range of classifier-free guidance")
    g.add_argument("--autoguide", default=None,
                   help="autoguidance's weaker model: 'weak' / 'early' (shipped) or a run dir or checkpoint with "
                        "the main model's conditioning (default for shipped models: weak)")
    g.add_argument("--autoguide-scale", type=_number(float, 0.0), default=1.0,
                   help="autoguidance w: D_weak + w (D_main - D_weak) (1 = off)")
    g.add_argument("--autoguide-interval", type=interval, default=None, help="sigma range of autoguidance")
    g.add_argument("--x0-classifier", default=None,
                   help="a classifier of clean images for guidance on the denoised x0 (default for shipped models: "
                        "clean_classifier)")
    g.add_argument("--x0-scale", type=_number(float, 0.0), default=0.0, help="x0-classifier guidance scale (0 = none)")
    g.add_argument("--x0-temperature", type=_number(float, 0.0, low_open=True), default=1.0,
                   help="the x0 classifier's logits are divided by this")
    g.add_argument("--x0-interval", type=interval, default=None, help="sigma range of x0-classifier guidance")
    g.add_argument("--x0-schedule", choices=tuple(SCHEDULES), default="constant")
    return g


def build_parser() -> Parser:
    p = Parser(prog="sample_guided.py", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    g = add_guidance_args(p)
    g.add_argument("--scales", type=_scales, default=None, help="a sweep, e.g. 0,1,2,4,10: one folder per scale")
    add_sampler_args(p)
    e = p.add_argument_group("SDEdit")
    e.add_argument("--init-image", default=None, help="a guide image to perturb and denoise")
    e.add_argument("--t0", type=_number(float), default=0.5, help="how far to perturb, in (0, 1]")
    e.add_argument("--mask", default=None, help="a mask image, white where the picture may change")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="out", help="output folder (samples.npz, grid.png, settings.json)")
    o.add_argument("--overwrite", action="store_true", help="replace samples already in --out")
    o.add_argument("--png", action="store_true", help="also write one PNG per sample")
    o.add_argument("--grid", type=_number(int, 0), default=10,
                   help="samples per class shown in grid.png, each class on its own rows (0: no grid.png)")
    return p


ADAPTIVE = {"ode": "adaptive RK45, rtol = atol = 1e-5", "langevin": "the model's noise ladder"}


def options(args, scale) -> SampleOptions:
    steps = args.steps or "100"
    if args.sampler in ADAPTIVE and not getattr(args, "init_image", None):  # SDEdit runs its own steps
        if args.steps is not None:
            raise GuidedError(f"--sampler {args.sampler} chooses its own steps ({ADAPTIVE[args.sampler]}); "
                              f"drop --steps {args.steps}, or pick ddpm, ddim, dpm++ or pc for a fixed count")
        steps = ADAPTIVE[args.sampler]
    return SampleOptions(sampler=args.sampler, steps=steps, scale=scale, cfg_scale=args.cfg_scale,
                         eta=args.eta, clip_denoised=not args.no_clip, clip_guided=clip_guided(args),
                         precision=args.precision, interval=args.interval, schedule=args.schedule,
                         calibration=not args.no_calibration, ddpm_form=args.ddpm_form, cfg_interval=args.cfg_interval,
                         autoguide_scale=args.autoguide_scale, autoguide_interval=args.autoguide_interval,
                         x0_scale=args.x0_scale, x0_temperature=args.x0_temperature, x0_interval=args.x0_interval,
                         x0_schedule=args.x0_schedule)


def clip_guided(args) -> bool:
    """--clip-guided as given, else the shipped model's default; off (the paper's arithmetic) for
    every model not in SHIPPED_MODELS and for the samplers it does not change."""
    if args.clip_guided is None:
        default = SHIPPED_MODELS.get(args.model, {}).get("clip_guided", False)
        score_ddpm = args.sampler == "ddpm" and getattr(args, "ddpm_form", "mean") == "score"
        return default and (args.sampler in CLIP_GUIDED_SAMPLERS or score_ddpm) and not args.no_clip
    if args.clip_guided and args.no_clip:
        raise GuidedError("--clip-guided clips x0 to [-1, 1]; it cannot go with --no-clip")
    if args.clip_guided and args.sampler not in CLIP_GUIDED_SAMPLERS and not (
            args.sampler == "ddpm" and args.ddpm_form == "score"):
        raise GuidedError(f"--clip-guided does not change the {args.sampler} sampler; it applies to "
                          f"{', '.join(CLIP_GUIDED_SAMPLERS)}")
    return args.clip_guided


def processes(args):
    """(device, rank, world size, barrier) under plain python or accelerate launch."""
    from accelerate import PartialState

    check_device(args.device)
    device = args.device or default_device()
    state = PartialState(cpu=device == "cpu") if device in ("cpu", "cuda") else None  # cpu: gloo under a launcher
    if state is None or state.num_processes == 1:
        check_world_size(1, device)
        return device, 0, 1, None
    return str(state.device), state.process_index, state.num_processes, state.wait_for_everyone


def check_device(name) -> None:
    """Refuse a --device torch cannot parse or this machine does not have, in one line."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise GuidedError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise GuidedError(f"--device {name}: no such CUDA device here (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GuidedError(f"--device {name}: MPS is not available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise GuidedError(f"--device {name}: only cpu, cuda and mps are supported")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def official_flags(path: str, flags, option: str, classifier: bool):
    """The ADM flag string to build `path` with: `flags` as given, with a warning naming each
    difference from the published preset when `path` has a released file name; that preset
    (with a note) when no flags were given and no config of a run sits beside the file; else None."""
    from guided.networks.checkpoints import config_beside

    name = adm.released_name(path)
    if name is None or flags and adm.is_classifier_name(name) != classifier:
        return flags
    if flags:
        diffs = adm.flag_differences(flags, name)
        if diffs:
            print(f"warning: {option} differ from the published flags of {name} (other images than the "
                  f"paper's): " + "; ".join(diffs), file=sys.stderr)
        return flags
    if config_beside(path) is not None:  # a model trained here under a released name
        return None
    if adm.is_classifier_name(name) != classifier:
        what, right = ("classifier", "--classifier") if adm.is_classifier_name(name) else ("score model", "--model")
        raise GuidedError(f"{path} is the released {what} {name}: pass it as {right}")
    print(f"note: {path}: no {option} given, using the published flags of the released {name} "
          f"(guided.networks.adm.PUBLISHED)", file=sys.stderr)
    return adm.PUBLISHED[name]


def load_pipeline(args, device) -> Pipeline:
    from guided.networks.checkpoints import load_trained, read_state_dict
    from guided.networks.unet import EncoderUNetModel, UNetModel

    shipped = args.model in SHIPPED_MODELS
    extra = {}
    model_flags = None if shipped else official_flags(args.model, args.adm_flags, "--adm-flags", classifier=False)
    if model_flags:
        weights = read_state_dict(args.model)  # a damaged file is named before a large network is built
        model = adm.load_state_dict_strict(adm.create_model(model_flags), weights, args.model)
        diffusion_cfg, label_map = adm.diffusion_config(model_flags), _imagenet_labels(model.num_classes)
    else:
        path = SHIPPED / f"{SHIPPED_MODELS[args.model]['file']}.pt" if shipped else Path(args.model)
        model, run_cfg, label_map = load_trained(path)
        if not isinstance(model, UNetModel):
            raise GuidedError(f"--model {args.model} holds a noise-aware classifier, not a score model "
                              f"(pass it as --classifier)")
        diffusion_cfg, objective = run_cfg.diffusion, run_cfg.train.objective
        extra = {"objective": objective.name}
        if objective.name == "ncsn":
            from guided.diffusion.ladder import geometric_sigmas
            extra["ncsn_sigmas"] = geometric_sigmas(objective.ncsn_sigma_max, objective.ncsn_sigma_min,
                                                    objective.ncsn_levels)
    classifier = None
    defaults = SHIPPED_MODELS.get(args.model, {})
    spec = classifier_spec(args)
    flags = args.classifier_flags
    if flags and "--image_size" not in flags and model_flags:
        flags += f" --image_size {model.cfg.image_size}"
    if spec != "none" and spec not in SHIPPED_NETWORKS:
        flags = official_flags(spec, flags, "--classifier-flags", classifier=True)
    if spec != "none":
        if flags:
            weights = read_state_dict(spec)
            classifier = adm.load_state_dict_strict(adm.create_classifier(flags), weights, spec)
        else:
            classifier, _, clf_labels = load_trained(shipped_path(spec))
            if not isinstance(classifier, EncoderUNetModel):
                raise GuidedError(f"--classifier {spec} holds a score model (U-Net), not a noise-aware classifier")
            label_map = label_map or clf_labels
    if label_map is None and classifier is not None and flags:
        label_map = _imagenet_labels(classifier.cfg.num_classes)
    wanted = getattr(args, "load_guides", ())  # guide networks to load whatever the scale (the demo: all; a sweep:
    wanted = ("autoguide", "x0_classifier") if wanted is True else wanted  # the swept term's)

    def want(term):
        return term in wanted and (getattr(args, term) or defaults.get(term))
    weak = (guide_network(args, "autoguide", defaults, UNetModel, "a score model")
            if args.autoguide_scale != 1 or want("autoguide") else None)
    clean = (guide_network(args, "x0_classifier", defaults, EncoderUNetModel, "a classifier")
             if args.x0_scale or want("x0_classifier") else None)
    fast = dict(channels_last=args.channels_last, compile=args.compile, cuda_graphs=args.cuda_graphs)
    model, classifier, weak, clean = (None if net is None else speed_up(net.eval().to(device), **fast)
                                      for net in (model, classifier, weak, clean))
    return Pipeline(model, diffusion_cfg, classifier, label_map, name=str(args.model), weak_model=weak,
                    x0_classifier=clean, unconditional=defaults.get("unconditional", False), **extra)


def classifier_spec(args) -> str:
    """The classifier --classifier names, or the shipped model's default ('none' for any other model)."""
    if args.classifier is not None:
        return args.classifier
    return SHIPPED_MODELS.get(args.model, {}).get("classifier", "none")


def guide_settings(args) -> dict:
    """The autoguidance and x0-classifier networks used, for settings.json."""
    defaults = SHIPPED_MODELS.get(args.model, {})
    return {"autoguide": (args.autoguide or defaults.get("autoguide")) if args.autoguide_scale != 1 else None,
            "x0_classifier": (args.x0_classifier or defaults.get("x0_classifier")) if args.x0_scale else None}


def shipped_path(spec: str) -> Path:
    """A shipped network's file for its name (SHIPPED_NETWORKS), else the path as given."""
    return SHIPPED / f"{spec}.pt" if spec in SHIPPED_NETWORKS else Path(spec)


def guide_network(args, option: str, defaults: dict, kind, what: str):
    """The network of --autoguide / --x0-classifier: as given, else the shipped model's default."""
    from guided.networks.checkpoints import load_trained

    spec = getattr(args, option) or defaults.get(option)
    flag = "--" + option.replace("_", "-")
    if spec is None:
        raise GuidedError(f"{flag} is needed: {what} for this guidance term (a run dir or checkpoint)")
    net, _, _ = load_trained(shipped_path(spec))
    if not isinstance(net, kind):
        raise GuidedError(f"{flag} {spec} does not hold {what}")
    return net


def _imagenet_labels(num_classes):
    if num_classes != 1000:
        return None
    from guided.data.labels import LabelMap, imagenet_classes
    return LabelMap.from_keys(c.wnid for c in imagenet_classes())


def parse_classes(text, pipeline: Pipeline) -> list[int]:
    """--class values (a string, or the list of a repeated --class) as class indices, in order."""
    n = pipeline.num_classes
    if text is None:
        return list(range(n)) if n is not None else []
    if n is None:
        raise GuidedError("--class needs a class-conditional model or a classifier")
    out = []
    for item in (s.strip() for s in ",".join([text] if isinstance(text, str) else text).split(",")):
        if pipeline.label_map is not None:
            out.append(pipeline.label_map.index(item))
        elif item.isdigit():
            out.append(int(item))
        else:
            raise GuidedError(f"class {item!r}: this model has no label map, give a class index 0..{n - 1}")
        if not 0 <= out[-1] < n:
            raise GuidedError(f"class {out[-1]} is outside the model's {n} classes (0..{n - 1})")
    return out


def read_image(path, size, channels, mode="RGB") -> torch.Tensor:
    """A guide or mask image as a [C, size, size] tensor in [-1, 1] (mask: [1, size, size] in [0, 1])."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if mode == "L" else "RGB").resize((size, size), Image.BICUBIC)
    except FileNotFoundError:
        raise GuidedError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError):
        raise GuidedError(f"{path} is not an image PIL can read") from None
    a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    if mode == "L":
        return (a[None] > 0.5).float()
    a = a.permute(2, 0, 1)[:channels] * 2 - 1
    return a


def sdedit_init(args, pipeline: Pipeline):
    if args.init_image is None:
        if args.mask is not None:
            raise GuidedError("--mask goes with --init-image")
        return None
    if not 0 < args.t0 <= 1:
        raise GuidedError(f"--t0 must be in (0, 1], got {args.t0}")
    c, size, _ = pipeline.shape()
    init = {"image": read_image(args.init_image, size, c), "t0": args.t0}
    if args.mask is not None:
        from PIL import Image
        with Image.open(args.init_image) as a, Image.open(args.mask) as b:
            if a.size != b.size:
                raise GuidedError(f"the mask is {b.size[0]}x{b.size[1]} but the image is {a.size[0]}x{a.size[1]}")
        init["mask"] = read_image(args.mask, size, 1, mode="L")
    return init


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(_main, args)


def _main(args) -> int:
    for scale in args.scales or [args.scale]:
        options(args, scale)  # contradictory sampler options are refused before any loading
    device, rank, world, barrier = processes(args)
    if rank == 0:
        print(f"sampling on {world} process{'es' if world > 1 else ''}, device {device}", flush=True)
    pipeline = load_pipeline(args, device)
    classes = parse_classes(args.classes, pipeline)
    init = sdedit_init(args, pipeline)
    settings = {"model": args.model, "classifier": classifier_spec(args), "device": device, **guide_settings(args),
                "init_image": args.init_image, "t0": args.t0 if args.init_image else None, "mask": args.mask}
    for scale in args.scales or [args.scale]:
        out = Path(args.out) / f"scale_{scale:g}" if args.scales else Path(args.out)
        path = generate(pipeline, out, classes=classes, num_samples=args.num_samples, batch_size=args.batch_size,
                        seed=args.seed, opts=options(args, scale), device=device, overwrite=args.overwrite,
                        save_pngs=args.png, init=init, rank=rank, world_size=world, barrier=barrier,
                        settings=settings, grid=args.grid, class_sampling=args.class_sampling)
        if rank == 0:
            print(f"wrote {path} and {path.parent / 'grid.png'} (scale {scale:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
