"""The paper's flag names, its published presets, and strict checkpoint loading.

The released code configures everything through command-line flags
(`--num_channels 192 --learn_sigma True ...`). `parse_flags` reads such a
string (or a dict of the same names); `unet_config`, `classifier_config` and
`diffusion_config` turn it into this project's typed config nodes, with the
reference's defaults (`model_and_diffusion_defaults`, `classifier_defaults`).
A flag it does not know, or one it cannot honour, is an error naming it.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Mapping

import torch

from guided.config import ClassifierConfig, DiffusionConfig, UNetConfig, node
from guided.errors import GuidedError
from guided.networks.unet import EncoderUNetModel, UNetModel

NUM_CLASSES = 1000


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("true", "1", "yes", "t", "y"):
        return True
    if s in ("false", "0", "no", "f", "n"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


# flag -> (type, reference default). Types parse the string form of the flag.
MODEL_FLAGS = {
    "image_size": (int, 64), "num_channels": (int, 128), "num_res_blocks": (int, 2), "num_heads": (int, 4),
    "num_heads_upsample": (int, -1), "num_head_channels": (int, -1), "attention_resolutions": (str, "16,8"),
    "channel_mult": (str, ""), "dropout": (float, 0.0), "class_cond": (_bool, False), "use_checkpoint": (_bool, False),
    "use_scale_shift_norm": (_bool, True), "resblock_updown": (_bool, False), "use_fp16": (_bool, False),
    "use_new_attention_order": (_bool, False), "num_classes": (int, NUM_CLASSES), "in_channels": (int, 3),
}
DIFFUSION_FLAGS = {
    "learn_sigma": (_bool, False), "diffusion_steps": (int, 1000), "noise_schedule": (str, "linear"),
    "timestep_respacing": (str, ""), "use_kl": (_bool, False), "predict_xstart": (_bool, False),
    "rescale_timesteps": (_bool, False), "rescale_learned_sigmas": (_bool, False), "sigma_small": (_bool, False),
}
CLASSIFIER_FLAGS = {
    "classifier_use_fp16": (_bool, False), "classifier_width": (int, 128), "classifier_depth": (int, 2),
    "classifier_attention_resolutions": (str, "32,16,8"), "classifier_use_scale_shift_norm": (_bool, True),
    "classifier_resblock_updown": (_bool, True), "classifier_pool": (str, "attention"),
}
# Flags of the reference's sampling scripts: accepted in a pasted flag string, used by the sampler.
SAMPLING_FLAGS = {
    "classifier_scale": (float, 1.0), "use_ddim": (_bool, False), "clip_denoised": (_bool, True),
    "batch_size": (int, 16), "num_samples": (int, 10000), "model_path": (str, ""), "classifier_path": (str, ""),
}
ALL_FLAGS = {**MODEL_FLAGS, **DIFFUSION_FLAGS, **CLASSIFIER_FLAGS, **SAMPLING_FLAGS}

DEFAULT_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                        64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}

_IMAGENET = "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --learn_sigma True " \
            "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 " \
            "--resblock_updown True --use_fp16 True --use_scale_shift_norm True"
_CLASSIFIER = "--classifier_attention_resolutions 32,16,8 --classifier_width 128 --classifier_pool attention " \
              "--classifier_resblock_updown True --classifier_use_scale_shift_norm True"
# The released checkpoints and the flags published with them (the reference's README).
PUBLISHED = {
    "64x64_diffusion.pt": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
                          "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
                          "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
                          "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
    "128x128_diffusion.pt": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
                            "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
                            "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
                            "--use_scale_shift_norm True",
    "256x256_diffusion.pt": _IMAGENET + " --image_size 256",
    "256x256_diffusion_uncond.pt": _IMAGENET.replace("--class_cond True", "--class_cond False") + " --image_size 256",
    "512x512_diffusion.pt": _IMAGENET.replace("--use_fp16 True", "--use_fp16 False") + " --image_size 512",
    "64x64_classifier.pt": _CLASSIFIER + " --classifier_depth 4 --image_size 64",
    "128x128_classifier.pt": _CLASSIFIER + " --classifier_depth 2 --image_size 128",
    "256x256_classifier.pt": _CLASSIFIER + " --classifier_depth 2 --image_size 256",
    "512x512_classifier.pt": _CLASSIFIER + " --classifier_depth 2 --image_size 512",
}
# Where the reference's README links the released checkpoints.
RELEASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
# The flags a classifier shares with the U-Net, with the reference's classifier defaults.
CLASSIFIER_SHARED = {"image_size": (int, 64), "in_channels": (int, 3), "num_head_channels": (int, 64),
                     "num_classes": (int, NUM_CLASSES), "channel_mult": (str, "")}
# Flags that change nothing this code samples: training-only ones, the reference's fp16 switch
# (here --precision decides) and the respacing (here --steps decides).
NOT_SAMPLED = {"dropout", "use_checkpoint", "use_kl", "rescale_learned_sigmas", "use_fp16", "classifier_use_fp16",
               "timestep_respacing"}


def parse_flags(flags: str | Mapping[str, Any]) -> dict[str, Any]:
    """`--name value ...` (or a dict of the same names) -> {name: typed value}.

    Unknown names and values of the wrong type are GuidedErrors naming the flag.
    """
    if isinstance(flags, str):
        tokens, items = shlex.split(flags), []
        for i in range(0, len(tokens), 2):
            name = tokens[i]
            if not name.startswith("--") or i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise GuidedError(f"flag string must be '--name value' pairs; cannot read {name!r}")
            items.append((name[2:], tokens[i + 1]))
    else:
        items = list(flags.items())
    out = {}
    for name, value in items:
        if name not in ALL_FLAGS:
            raise GuidedError(f"unknown ADM flag --{name}")
        kind = ALL_FLAGS[name][0]
        try:
            out[name] = kind(value) if not (kind is str and value is None) else ""
        except (TypeError, ValueError):
            raise GuidedError(f"flag --{name} takes a {kind.__name__.strip('_')}, got {value!r}") from None
    return out


def _get(flags, table, name):
    return flags.get(name, table[name][1])


def _channel_mult(flags, image_size) -> list[float]:
    text = flags.get("channel_mult", "")
    if text:
        try:
            return [float(m) for m in str(text).split(",")]
        except ValueError:
            raise GuidedError(f"flag --channel_mult must be comma-separated numbers, got {text!r}") from None
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise GuidedError(f"no default channel_mult for image_size {image_size}; give --channel_mult")
    return list(DEFAULT_CHANNEL_MULT[image_size])


def _resolutions(text: str, name: str) -> list[int]:
    try:
        return [int(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        raise GuidedError(f"flag --{name} must be comma-separated integers, got {text!r}") from None


def unet_config(flags: str | Mapping[str, Any]):
    """The reference's `create_model` flags -> a UNetConfig node."""
    f = parse_flags(flags)
    g = lambda n: _get(f, MODEL_FLAGS, n)  # noqa: E731
    size = g("image_size")
    return node(UNetConfig, dict(
        image_size=size, in_channels=g("in_channels"), model_channels=g("num_channels"),
        num_res_blocks=g("num_res_blocks"), channel_mult=_channel_mult(f, size),
        attention_resolutions=_resolutions(g("attention_resolutions"), "attention_resolutions"),
        num_heads=g("num_heads"), num_head_channels=g("num_head_channels"),
        num_heads_upsample=g("num_heads_upsample"), use_scale_shift_norm=g("use_scale_shift_norm"),
        resblock_updown=g("resblock_updown"), use_new_attention_order=g("use_new_attention_order"),
        dropout=g("dropout"), num_classes=g("num_classes") if g("class_cond") else None,
        learn_sigma=_get(f, DIFFUSION_FLAGS, "learn_sigma"), use_checkpoint=g("use_checkpoint")))


def classifier_config(flags: str | Mapping[str, Any]):
    """The reference's `create_classifier` flags -> a ClassifierConfig node."""
    f = parse_flags(flags)
    g = lambda n: _get(f, {**CLASSIFIER_FLAGS, **CLASSIFIER_SHARED}, n)  # noqa: E731
    size = g("image_size")
    return node(ClassifierConfig, dict(
        image_size=size, in_channels=g("in_channels"), model_channels=g("classifier_width"),
        num_res_blocks=g("classifier_depth"), channel_mult=_channel_mult(f, size),
        attention_resolutions=_resolutions(g("classifier_attention_resolutions"), "classifier_attention_resolutions"),
        num_head_channels=g("num_head_channels"), use_scale_shift_norm=g("classifier_use_scale_shift_norm"),
        resblock_updown=g("classifier_resblock_updown"), pool=g("classifier_pool"), num_classes=g("num_classes")))


def diffusion_config(flags: str | Mapping[str, Any]):
    """The reference's `create_gaussian_diffusion` flags -> a DiffusionConfig node."""
    f = parse_flags(flags)
    g = lambda n: _get(f, DIFFUSION_FLAGS, n)  # noqa: E731
    if g("learn_sigma"):
        variance = "learned_range"
    else:
        variance = "fixed_small" if g("sigma_small") else "fixed_large"
    if g("use_kl"):
        loss = "rescaled_kl"
    else:
        loss = "rescaled_mse" if g("rescale_learned_sigmas") else "mse"
    return node(DiffusionConfig, dict(
        steps=g("diffusion_steps"), noise_schedule=g("noise_schedule"), variance=variance,
        predict_xstart=g("predict_xstart"), loss=loss, rescale_timesteps=g("rescale_timesteps"),
        timestep_respacing=g("timestep_respacing")))


def released_name(path) -> str | None:
    """The file name of `path` when it is one of the nine released checkpoints' names, else None."""
    name = Path(str(path)).name
    return name if name in PUBLISHED else None


def is_classifier_name(name: str) -> bool:
    return "classifier" in name


def _sampled_flags(flags, classifier: bool) -> dict[str, str]:
    """Every flag that shapes what is sampled, at its effective value (defaults filled in, channel_mult
    resolved from the image size, attention resolutions as a set), as the text a flag string holds."""
    f = parse_flags(flags)
    table = {**CLASSIFIER_FLAGS, **CLASSIFIER_SHARED} if classifier else {**MODEL_FLAGS, **DIFFUSION_FLAGS}
    out = {n: f.get(n, default) for n, (_, default) in table.items() if n not in NOT_SAMPLED}
    out["channel_mult"] = ",".join(f"{m:g}" for m in _channel_mult(f, out["image_size"]))
    for n in ("attention_resolutions", "classifier_attention_resolutions"):
        if n in out:
            out[n] = ",".join(str(r) for r in sorted(set(_resolutions(out[n], n)), reverse=True))
    return {n: str(v) for n, v in out.items()}


def flag_differences(flags, name: str) -> list[str]:
    """'--flag VALUE (published: VALUE)' for each flag of `flags` that samples differently from the
    published preset of the released file `name`. Flags that add no parameters (e.g.
    --use_new_attention_order) show only here: a strict key and shape check cannot see them."""
    classifier = is_classifier_name(name)
    mine, published = _sampled_flags(flags, classifier), _sampled_flags(PUBLISHED[name], classifier)
    return [f"--{n} {mine[n]} (published: {published[n]})" for n in published if mine[n] != published[n]]


def _build(cls, cfg, device):
    try:
        if device is None:
            return cls(cfg)
        with torch.device(device):
            return cls(cfg)
    except ValueError as e:
        raise GuidedError(f"cannot build {cls.__name__}: {e}") from None


def create_model(flags, device=None) -> UNetModel:
    """A U-Net from the paper's flags (a dict or a '--flag value' string); device='meta' allocates nothing."""
    return _build(UNetModel, unet_config(flags), device)


def create_classifier(flags, device=None) -> EncoderUNetModel:
    return _build(EncoderUNetModel, classifier_config(flags), device)


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes that torch.compile (`_orig_mod.`) and DDP (`module.`) add."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint"):
    """load_state_dict(strict=True) whose failure is one line naming the first
    missing and unexpected keys and shape mismatches."""
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (first: {k} {tuple(state_dict[k].shape)} "
                         f"vs {tuple(own[k].shape)})")
        raise GuidedError(f"{what} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    return model
