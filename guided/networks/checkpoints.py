"""Trained networks on disk: compact weight exports, `load_trained`, `ship`.

A run directory (train.out_dir) holds config.yaml (the resolved RunConfig), label_map.json,
the training checkpoints ckpt-*.pt (guided.training.checkpoints) and the weights-only
exports model.pt / ema.pt (ema.pt: the first EMA rate) written here. Every file is written
atomically (guided.files). Files are plain dicts of tensors, numbers and strings, read with
torch.load(weights_only=True). A weights file carries its config and label map, so it is
self-contained; a `<stem>.yaml` or `config.yaml` beside it wins.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf.errors import OmegaConfBaseException

from guided.config import load_config, saved_config, to_yaml
from guided.errors import GuidedError
from guided.files import CKPT_FORMAT, atomic_save, atomic_write_text, list_checkpoints, read_file
from guided.networks.adm import RELEASE_URL, clean_state_dict, load_state_dict_strict, released_name
from guided.data import LabelMap
from guided.guidance.calibration import Calibration
from guided.networks.preconditioned import build_unet  # a recipe's U-Net returns eps, as the paper's
from guided.networks.unet import EncoderUNetModel

WEIGHTS_FORMAT = "guided-weights"


# -- writing ------------------------------------------------------------------------------------
def export_weights(path: str | Path, state_dict: dict, *, kind: str, cfg, label_map=None, which: str = "model",
                   step: int = 0, dtype: str = "fp32", calibration: dict | None = None) -> Path:
    """A compact, self-contained weights file for sampling (fp32 or fp16 floats); a classifier's
    calibration (guided/guidance/calibration.py, Calibration.to_dict) travels in it."""
    if dtype not in ("fp32", "fp16"):
        raise GuidedError(f"export dtype must be fp32 or fp16, not {dtype!r}")
    cast = torch.float16 if dtype == "fp16" else torch.float32
    weights = {k: (v.detach().to("cpu", cast) if v.is_floating_point() else v.detach().cpu()).clone()
               for k, v in clean_state_dict(state_dict).items()}
    return atomic_save({"format": WEIGHTS_FORMAT, "version": 1, "kind": kind, "which": which, "step": step,
                        "config": to_yaml(cfg), "label_map": label_map.to_dict() if label_map else None,
                        "state_dict": weights, **({"calibration": calibration} if calibration else {})}, path)


# -- loading a trained model --------------------------------------------------------------------
def pick_weights(state: dict, which: str | None, where) -> tuple[dict, str]:
    """(state_dict, name) of `which` in a full checkpoint: "model", "ema" (the first rate),
    "ema:<rate>", or None (EMA when there is one, else the model)."""
    emas = state.get("ema") or {}
    if which is None:
        which = "ema" if emas else "model"
    if which == "model":
        return state["model"], "model"
    if which == "ema" and emas:
        rate = next(iter(emas))
        return emas[rate], f"ema:{rate}"
    if which.startswith("ema:") and which[4:] in emas:
        return emas[which[4:]], which
    have = ", ".join(["model"] + [f"ema:{r}" for r in emas])
    raise GuidedError(f"{where} has no {which!r} weights (it has: {have})")


def _beside(path: Path, names: list[str]) -> Path | None:
    return next((path.parent / n for n in names if (path.parent / n).is_file()), None)


def config_beside(path: str | Path) -> Path | None:
    """The run config that training wrote beside a weights file (`<stem>.yaml` or config.yaml), if any."""
    path = Path(path)
    return _beside(path, [f"{path.stem}.yaml", "config.yaml"])


def _config_for(path: Path, embedded: str | None, kind: str):
    side = config_beside(path)
    if side is not None:
        return load_config(side)
    if embedded:
        try:
            return saved_config(embedded)
        except OmegaConfBaseException as e:
            raise GuidedError(f"the config stored in {path} is unreadable: {e}") from None
    option = "--adm-flags" if kind == "unet" else "--classifier-flags"
    raise GuidedError(f"no config for {path}: it is a bare state dict, like the paper's released ADM checkpoints, "
                      f"which take their published flags with {option} (the nine released file names need none); "
                      f"a model trained here needs its config.yaml beside it")


def _label_map_for(path: Path, embedded: dict | None):

    side = _beside(path, [f"{path.stem}.labels.json", "label_map.json"])
    if side is not None:
        return LabelMap.load(side)
    return LabelMap.from_dict(embedded) if embedded else None


def _infer_kind(state_dict: dict) -> str:
    score = ("output_blocks.", "final_layer.")  # the U-Net's decoder, the DiT's last layer
    return "unet" if any(k.startswith(score) for k in clean_state_dict(state_dict)) else "classifier"


def _weights_file(path: Path, which: str | None) -> Path:
    """The file inside a run folder that holds `which`."""
    if which in (None, "ema") and (path / "ema.pt").is_file():
        return path / "ema.pt"
    if which in (None, "model") and (path / "model.pt").is_file():
        return path / "model.pt"
    found = list_checkpoints(path)
    if not found:
        raise GuidedError(f"{path} holds no weights (model.pt, ema.pt or ckpt-*.pt)")
    return found[-1][1]


def _unpack(obj, which: str | None, path: Path) -> dict:
    """{state_dict, kind, config (text), label_map (dict), which, step} of whatever a weights path held."""
    if isinstance(obj, dict) and obj.get("format") == WEIGHTS_FORMAT:
        if which not in (None, obj["which"]) and not (which == "ema" and obj["which"].startswith("ema")):
            raise GuidedError(f"{path} holds the {obj['which']} weights, not {which!r}")
        return dict(state_dict=obj["state_dict"], kind=obj["kind"], config=obj["config"],
                    label_map=obj["label_map"], which=obj["which"], step=obj.get("step", 0),
                    calibration=obj.get("calibration"))
    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        sd, name = pick_weights(obj, which, path)
        return dict(state_dict=sd, kind=obj["kind"], config=obj["config"], label_map=obj.get("label_map"),
                    which=name, step=obj["step"], calibration=obj.get("calibration"))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # a bare state dict, e.g. a released ADM checkpoint
        return dict(state_dict=obj, kind=_infer_kind(obj), config=None, label_map=None, which="model", step=0)
    raise GuidedError(f"{path} is neither a weights file, a checkpoint nor a state dict")


def read_state_dict(path: str | Path, which: str | None = None) -> dict:
    """The state dict in a bare .pt (e.g. the paper's released 256x256_diffusion.pt), a weights
    file or a checkpoint, with torch.compile / DDP prefixes removed; non-finite weights are refused."""
    return check_finite(clean_state_dict(_unpack(read_weights(path), which, Path(path))["state_dict"]), path)


def read_weights(path):
    """A weights file read in one line's failure; a released checkpoint's message names its address."""
    name = released_name(path)
    return read_file(path, "weights file", url=None if name is None else RELEASE_URL + name)


def check_finite(state_dict: dict, where) -> dict:
    """Refuse weights that hold NaN or inf (a diverged or damaged run), naming the first such tensor:
    a model with them draws black images that would still be scored."""
    for name, v in state_dict.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            kind = "NaN" if torch.isnan(v).any() else "inf"
            raise GuidedError(f"weights {where}: tensor {name} holds {kind} ({bad} of {v.numel()} values are not "
                              f"finite); the run diverged or the file is damaged: use an earlier checkpoint")
    return state_dict


def resolve_trained(path_or_dir, which: str | None = None) -> tuple[dict, object, object, Path]:
    """(unpacked weights, cfg, label_map, file) of a run folder, a weights file, a full checkpoint
    or a bare state dict with a config.yaml beside it; see _unpack for the first."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = _weights_file(path, which)
    w = _unpack(read_weights(path), which, path)
    return w, _config_for(path, w["config"], w["kind"]), _label_map_for(path, w["label_map"]), path


def ship(path_or_dir, out: str | Path, which: str | None = None, dtype: str = "fp16") -> Path:
    """Export trained weights for distribution: `out` (self-contained), `<stem>.yaml` and
    label_map.json beside it. E.g. ship("runs/digits", "guided/assets/digits/cond.pt")."""
    w, cfg, label_map, _ = resolve_trained(path_or_dir, which)
    out = Path(out)
    export_weights(out, w["state_dict"], kind=w["kind"], cfg=cfg, label_map=label_map, which=w["which"],
                   step=w["step"], dtype=dtype, calibration=w.get("calibration"))
    atomic_write_text(out.with_suffix(".yaml"), to_yaml(cfg))
    if label_map is not None:
        atomic_write_text(out.parent / "label_map.json", json.dumps(label_map.to_dict(), indent=1) + "\n")
    return out


def build_network(kind: str, cfg):

    if kind == "unet":
        return build_unet(cfg)
    try:
        return EncoderUNetModel(cfg.classifier)
    except ValueError as e:
        raise GuidedError(f"cannot build the {kind} of this config: {e}") from None


def load_trained(path_or_dir, which: str | None = None, device="cpu"):
    """A trained score model or classifier, ready for sampling: (model in eval mode, cfg, label_map).

    path_or_dir: a run folder (ema.pt / model.pt / the newest ckpt-*.pt), a weights file
    (e.g. guided/assets/digits/cond.pt) or a full checkpoint. which: "ema" (first rate),
    "ema:<rate>", "model", or None = EMA when present. cfg is the RunConfig it was trained
    with (cfg.model for a U-Net, cfg.classifier for a classifier); label_map may be None.
    """
    w, cfg, label_map, path = resolve_trained(path_or_dir, which)
    check_finite(w["state_dict"], path)
    model = build_network(w["kind"], cfg)
    load_state_dict_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in w["state_dict"].items()},
                           what=f"weights {path}")
    if w.get("calibration"):  # a classifier's temperatures per noise band (guided/guidance/calibration.py)
        model.calibration = Calibration.from_dict(w["calibration"])
    return model.to(device).eval(), cfg, label_map
