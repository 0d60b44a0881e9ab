"""Loading a pipeline from typed arguments: the shipped digits models, run folders and checkpoints of
the trainers, and the paper's official ADM checkpoints (built from their published flags); the
guide networks; class names; SDEdit's guide images.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from guided.config import DiffusionConfig, SamplingConfig, UNetConfig, node
from guided.diffusion.models import noise_process
from guided.diffusion.scheduler_config import clips_by_default, read as read_scheduler, scheduler_file
from guided.diffusion.objectives import adapt, objective_from_config
from guided.errors import GuidedError
from guided.generation.pipeline import Pipeline
from guided.guidance.terms import KINDS
from guided.networks import adm
from guided.networks.checkpoints import config_beside, load_trained, read_state_dict
from guided.networks.dit import DiT, released_config, released_state_dict
from guided.networks.diffusers import (PIPELINE_STEPS, default_sampler, is_diffusers_folder, load_latent, load_network,
                                      load_vae)
from guided.networks.preconditioned import SCORE_NETWORKS
from guided.networks.unet import EncoderUNetModel
from guided.samplers.sdedit import SDEdit, check_t0
from guided.speed import speed_up
from guided.data.labels import LabelMap, imagenet_classes

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "digits"
# The shipped digits models by name: their file in guided/assets/digits; their sampling defaults are in
# that file's config (the `sampling` node of <file>.yaml, guided.config.SamplingConfig). `uncond` is the
# null class of the label-dropout `cond` network (docs/guide/digits-models.md measures it against a separate
# unconditional model).
SHIPPED_MODELS = {"cond": {"file": "cond"}, "uncond": {"file": "cond", "unconditional": True},
                  "ncsn": {"file": "ncsn"}}
SHIPPED_NETWORKS = ("classifier", "ncsn_classifier", "clean_classifier", "weak", "early")  # by name, as --classifier etc.
NO_DEFAULTS = SamplingConfig()


def official_flags(path: str, flags, option: str, classifier: bool):
    """The ADM flag string to build `path` with: `flags` as given, with a warning naming each
    difference from the published preset when `path` has a released file name; that preset
    (with a note) when no flags were given and no config of a run sits beside the file; else None."""
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


def load_pipeline(model: str = "cond", classifier: Optional[str] = None, *, adm_flags: Optional[str] = None,
                  classifier_flags: Optional[str] = None, autoguide: Optional[str] = None,
                  x0_classifier: Optional[str] = None, guides=(), optional_guides=(), device="cpu",
                  channels_last: bool = False, compile: bool = False, cuda_graphs: bool = False,
                  scheduler: Optional[str] = None, term_networks: Optional[dict] = None,
                  vae: Optional[str] = None) -> Pipeline:
    """The pipeline of a score model: a shipped name (SHIPPED_MODELS), a run folder or checkpoint of the
    trainers, an official ADM checkpoint (released names need no flags), or a diffusers UNet2DModel (a
    pipeline folder, or a unet folder and `scheduler`, its scheduler_config.json). `classifier`: None = the
    shipped model's default, "none" = no classifier. `guides`: the guide networks to load ("autoguide",
    "x0_classifier": as named, else the shipped default, else an error); `optional_guides`: load those
    only where one is named or shipped. `term_networks`: {term name: path} of registered guidance terms'
    networks, each loaded by its term's loader (guided.guidance.terms.TermKind.load). `vae`: the VAE folder of a
    latent diffusers model whose folder holds none (a DiT or a UNet2DModel on latents: see docs, Latent models)."""
    net, diffusion_cfg, label_map, extra, model_flags = _score_network(model, adm_flags, scheduler, vae)
    defaults = extra.pop("defaults", NO_DEFAULTS)
    spec = classifier if classifier is not None else (defaults.classifier or "none")
    flags = classifier_flags
    if flags and "--image_size" not in flags and model_flags:
        flags += f" --image_size {net.cfg.image_size}"
    if spec != "none" and spec not in SHIPPED_NETWORKS:
        flags = official_flags(spec, flags, "--classifier-flags", classifier=True)
    clf = None
    if spec != "none":
        clf, clf_labels, clf_process = _classifier(spec, flags)
        extra.update(classifier_labels=clf_labels, classifier_process=clf_process)
        label_map = label_map or clf_labels
    if label_map is None and clf is not None and flags:
        label_map = _imagenet_labels(clf.cfg.num_classes)
    named = {"autoguide": autoguide, "x0_classifier": x0_classifier}

    def wanted(term):
        return term in guides or (term in optional_guides and (named[term] or getattr(defaults, term)))
    weak = guide_network(named["autoguide"], "autoguide", defaults, SCORE_NETWORKS, "a score model") \
        if wanted("autoguide") else None
    clean = guide_network(named["x0_classifier"], "x0_classifier", defaults, EncoderUNetModel, "a classifier") \
        if wanted("x0_classifier") else None
    fast = dict(channels_last=channels_last, compile=compile, cuda_graphs=cuda_graphs)
    net, clf, weak, clean = (None if n is None else speed_up(n.eval().to(device), **fast)
                             for n in (net, clf, weak, clean))
    extra["guides"] = {name: _term_network(name, path, device) for name, path in (term_networks or {}).items()}
    if getattr(extra.get("space"), "vae", None) is not None:
        extra["space"].vae.to(device)
    return Pipeline(net, diffusion_cfg, clf, label_map, name=str(model), weak_model=weak, x0_classifier=clean,
                    unconditional=SHIPPED_MODELS.get(model, {}).get("unconditional", False), defaults=defaults,
                    classifier_name=None if clf is None else spec, **extra)


@dataclass(frozen=True)
class ModelFormat:
    """A format of score model files, tried before the project's own (run folders, checkpoints, ADM files).

    `detect(path)` says whether a --model argument is of this format; `load(path, scheduler)` returns
    (network, diffusion config, label map or None, Pipeline keywords): the network takes (x, t[, y=])
    on the diffusion config's chain and carries the contract `cfg` (image_size, in_channels,
    num_classes, null_class, learn_sigma) and `num_classes` (guided/networks/diffusers.py is the model);
    the keywords may hold "defaults" (a guided.config.SamplingConfig), "objective" and "space" (a latent
    model's guided.diffusion.space.LatentSpace). `load_classifier(path)`, where given, loads a noise-aware
    classifier of the format for --classifier. `takes_vae`: `load` also takes `vae=` (--vae FOLDER)."""
    name: str
    detect: Callable[[str], bool]
    load: Callable
    load_classifier: Optional[Callable[[str], object]] = None
    takes_vae: bool = False


FORMATS: list[ModelFormat] = []


def register_format(fmt: ModelFormat) -> ModelFormat:
    """Add a model format (tried in order of registration, before the project's own files)."""
    if any(f.name == fmt.name for f in FORMATS):
        raise GuidedError(f"a model format named {fmt.name!r} is already registered")
    FORMATS.append(fmt)
    return fmt


def _format_of(path: str, scheduler=None) -> Optional[ModelFormat]:
    if scheduler is not None:  # a diffusers unet folder with its scheduler file
        return FORMATS[0]
    return next((f for f in FORMATS if f.detect(str(path))), None)


def _score_network(model: str, adm_flags, scheduler=None, vae=None):
    """(network, diffusion config, label map, Pipeline keywords, ADM flags or None) of --model."""
    fmt = _format_of(model, scheduler)
    if vae is not None and (fmt is None or not fmt.takes_vae):
        raise GuidedError(f"--vae goes with a latent diffusers model (a DiT or UNet2DModel folder without its vae/); "
                          f"--model {model} is a pixel model")
    if fmt is not None:
        net, diffusion_cfg, label_map, extra = fmt.load(model, scheduler, **({} if vae is None else {"vae": vae}))
        return net, diffusion_cfg, label_map, dict(extra), None
    shipped = model in SHIPPED_MODELS
    model_flags = None if shipped else official_flags(model, adm_flags, "--adm-flags", classifier=False)
    if model_flags:
        weights = read_state_dict(model)  # a damaged file is named before a large network is built
        net = adm.load_state_dict_strict(adm.create_model(model_flags), weights, model)
        return net, adm.diffusion_config(model_flags), _imagenet_labels(net.num_classes), {}, model_flags
    path = SHIPPED / f"{SHIPPED_MODELS[model]['file']}.pt" if shipped else Path(model)
    net, run_cfg, label_map = load_trained(path)
    if not isinstance(net, SCORE_NETWORKS):
        raise GuidedError(f"--model {model} holds a noise-aware classifier, not a score model "
                          f"(pass it as --classifier)")
    extra = {**objective_from_config(run_cfg).pipeline_kwargs(), "defaults": run_cfg.sampling}
    if run_cfg.data.get("vae"):  # trained on a VAE's latents (guided/data/latents.py): it samples latents
        extra["space"] = load_vae(run_cfg.data.vae, "the run's data.vae")
    return net, run_cfg.diffusion, label_map, extra, None


def _diffusers_network(model: str, scheduler, vae=None):
    """A diffusers UNet2DModel or DiT adapted to the project's networks (guided/networks/diffusers.py), with the
    latent space of its VAE where it has one, sampled as its diffusers pipeline does by default."""
    net, values, space = load_latent(model, scheduler, vae)
    extra = {"sampler_defaults": {"ddim": {"eps": "model"}}}  # DDIMScheduler.step's use_clipped_model_output=False
    if space is None:
        return net, node(DiffusionConfig, values), None, {**extra, "defaults": _pixel_defaults(model, scheduler)}
    sampler = default_sampler(model, scheduler)  # a latent folder samples as its diffusers pipeline does
    defaults = SamplingConfig(sampler=sampler, steps=PIPELINE_STEPS if sampler else None)
    return net, node(DiffusionConfig, values), None, {**extra, "space": space, "defaults": defaults}


def _pixel_defaults(model: str, scheduler) -> SamplingConfig:
    """A pixel folder's clip as its scheduler config says: clip_sample (to [-1, 1]) or none. What the project
    does not read is said: a clip_sample_range other than 1, and thresholding (--clip dynamic is the nearest)."""
    path = scheduler_file(model if scheduler is None else scheduler)
    cfg = {**read_scheduler(path), "clip_sample": clips_by_default(path)}
    if cfg.get("thresholding"):
        print(f"note: {model}: the scheduler's thresholding is not read; x0 is clipped to [-1, 1] (--clip dynamic "
              f"--clip-percentile {cfg.get('dynamic_thresholding_ratio', 0.995)} is Saharia et al.'s threshold "
              f"without its sample_max_value cap)", file=sys.stderr)
    elif cfg["clip_sample"] and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        print(f"note: {model}: clip_sample_range {cfg['clip_sample_range']} is not read; x0 is clipped to [-1, 1]",
              file=sys.stderr)
    return SamplingConfig(clip="static" if cfg["clip_sample"] or cfg.get("thresholding") else "none")


register_format(ModelFormat("diffusers", is_diffusers_folder, _diffusers_network, takes_vae=True))


def _released_dit(model: str, scheduler=None, vae=None):
    """A released DiT checkpoint (guided.networks.dit.released_state_dict) with the VAE of --vae: the chain of
    its train.py (linear, 1000 steps, learned sigma) and the sampler of its sample.py (DDPM, 250 steps)."""
    if vae is None:
        raise GuidedError(f"{model} is a released DiT: it samples a VAE's latents; give its VAE with --vae FOLDER "
                          f"(the diffusers AutoencoderKL sd-vae-ft-ema or sd-vae-ft-mse)")
    sd = released_state_dict(model)
    try:
        net = DiT(node(UNetConfig, released_config(sd)))
    except ValueError as e:
        raise GuidedError(f"{model}: {e}") from None
    adm.load_state_dict_strict(net, {k: v.float() for k, v in sd.items()}, model)
    space = load_vae(vae)
    if space.latent_channels != net.cfg.in_channels:
        raise GuidedError(f"the VAE of {vae} makes {space.latent_channels}-channel latents but {model} takes "
                          f"{net.cfg.in_channels}: use the VAE the model was trained with")
    chain = node(DiffusionConfig, dict(steps=1000, noise_schedule="linear", variance="learned_range", loss="mse"))
    defaults = SamplingConfig(sampler="ddpm", steps="250")
    return net, chain, _imagenet_labels(net.num_classes), {"space": space, "defaults": defaults}


register_format(ModelFormat("released DiT", lambda path: released_state_dict(path) is not None, _released_dit,
                            takes_vae=True))


def _term_network(name: str, path: str, device):
    """The network of a registered guidance term, by the term's own loader."""
    kind = KINDS.get(name)
    if kind is None:
        raise GuidedError(f"--guide-network {name}=...: no guidance term {name!r} is registered "
                          f"(registered: {', '.join(KINDS)})")
    if kind.load is None:
        raise GuidedError(f"the {name} guidance term loads no network from a path (its TermKind has no load)")
    net = kind.load(path)
    return net.eval().to(device) if isinstance(net, torch.nn.Module) else net


def _classifier(spec: str, flags):
    """(classifier, its label map) of --classifier: built from ADM flags, a registered format's, or a
    trained/shipped one."""
    fmt = next((f for f in FORMATS if f.load_classifier is not None and f.detect(spec)), None)
    if fmt is not None:
        return fmt.load_classifier(spec), None, None
    if flags:
        weights = read_state_dict(spec)
        return adm.load_state_dict_strict(adm.create_classifier(flags), weights, spec), None, None
    net, run_cfg, labels = load_trained(shipped_path(spec))
    if not isinstance(net, EncoderUNetModel):
        raise GuidedError(f"--classifier {spec} holds a score model (U-Net), not a noise-aware classifier")
    return net, labels, noise_process(adapt_run(run_cfg))


def adapt_run(run_cfg):
    """The ScoreModel of a run config's noise process (its objective on its diffusion config)."""
    objective = objective_from_config(run_cfg)
    return adapt(run_cfg.diffusion, objective.name, objective.pipeline_kwargs()["ncsn_sigmas"])


def shipped_path(spec: str) -> Path:
    """A shipped network's file for its name (SHIPPED_NETWORKS), else the path as given."""
    return SHIPPED / f"{spec}.pt" if spec in SHIPPED_NETWORKS else Path(spec)


def guide_network(named, option: str, defaults: SamplingConfig, kind, what: str):
    """The network of --autoguide / --x0-classifier: as given, else the model's default (its config's sampling)."""
    spec = named or getattr(defaults, option)
    flag = "--" + option.replace("_", "-")
    if spec is None:
        raise GuidedError(f"{flag} is needed: {what} for this guidance term (a run dir or checkpoint)")
    if kind is SCORE_NETWORKS and is_diffusers_folder(spec):  # a second diffusers model (its own scheduler folder)
        return load_network(spec)[0]  # a latent one's VAE is the main model's
    net, _, _ = load_trained(shipped_path(spec))
    if not isinstance(net, kind):
        raise GuidedError(f"{flag} {spec} does not hold {what}")
    return net


def _imagenet_labels(num_classes):
    if num_classes != 1000:
        return None
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

    check_image_file(path)
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


def check_image_file(path) -> None:
    """A guide or mask image argument: missing, a folder or an empty file is one line."""
    p = Path(path)
    if not p.exists():
        raise GuidedError(f"{path}: no such image")
    if p.is_dir():
        raise GuidedError(f"{path} is a folder, not an image")
    if p.stat().st_size == 0:
        raise GuidedError(f"{path} is empty (0 bytes), not an image")


def sdedit_request(pipeline: Pipeline, init_image: Optional[str], t0: float, mask: Optional[str] = None):
    """The SDEdit of a guide image file (and a mask image file), sized for the pipeline; None without one."""
    if init_image is None:
        if mask is not None:
            raise GuidedError("--mask goes with --init-image")
        return None
    t0 = check_t0(t0)
    c, size, _ = pipeline.image_shape()
    image = read_image(init_image, size, c)
    if mask is None:
        return SDEdit(_to_space(pipeline, image), t0)
    keep = read_image(mask, size, 1, mode="L")  # a missing or broken mask is one line
    from PIL import Image
    with Image.open(init_image) as a, Image.open(mask) as b:
        if a.size != b.size:
            raise GuidedError(f"the mask is {b.size[0]}x{b.size[1]} but the image is {a.size[0]}x{a.size[1]}")
    return SDEdit(_to_space(pipeline, image), t0, _to_space(pipeline, keep, mask=True))


def _to_space(pipeline: Pipeline, image: torch.Tensor, mask: bool = False) -> torch.Tensor:
    """A guide image [C, H, W] in [-1, 1] in the model's space: as it is for pixels, encoded by a latent model's VAE;
    a mask max-pooled to the latent grid (a latent cell may change where any of its pixels may)."""
    space = pipeline.space
    if space.bounded:
        return image
    if mask:
        return torch.nn.functional.adaptive_max_pool2d(image[None], pipeline.shape()[1:])[0]
    vae = space.vae
    with torch.no_grad():
        return space.encode(image[None].to(next(vae.parameters()).device))[0].float().cpu()
