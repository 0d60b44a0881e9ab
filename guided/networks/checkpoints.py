"""Checkpoints: atomic writes, resumable training states, compact weight exports, `load_trained`.

A run directory (train.out_dir) holds

    config.yaml        the resolved RunConfig of the run
    label_map.json     class index -> key and name (guided.data.LabelMap)
    ckpt-0001000.pt    the full training state after step 1000 (the newest `keep` are kept)
    model.pt, ema.pt   weights-only exports of the newest state (ema.pt: the first EMA rate)

Every file is written atomically: into a temporary file in the same folder,
flushed and fsync'ed, then renamed over its target with os.replace. A crash
leaves the old file or the new one, never a truncated one, and an old
checkpoint is deleted only once a newer one is complete.

Files are plain dicts of tensors, numbers and strings, read with
torch.load(weights_only=True). A weights file carries its config and label
map, so it is self-contained; a `<stem>.yaml` or `config.yaml` beside it wins.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from guided.networks.adm import RELEASE_URL, clean_state_dict, load_state_dict_strict, released_name
from guided.config import load_config, merge, structured, to_yaml
from guided.errors import GuidedError

CKPT_FORMAT, WEIGHTS_FORMAT = "guided-checkpoint", "guided-weights"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_CKPT_NAME = re.compile(r"^ckpt-(\d+)\.pt$")
# Test hook (fault injection, tests/test_faults.py): pause this many seconds between writing a
# ckpt-*.pt temp file and renaming it, so a harness can kill the process mid-checkpoint.
PAUSE_ENV = "GUIDED_FAULT_PAUSE_CKPT_WRITE"


# -- atomic writes ------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable) -> Path:
    """write(f) into a temporary file beside `path`, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if path.name.startswith("ckpt-") and os.environ.get(PAUSE_ENV):
                time.sleep(float(os.environ[PAUSE_ENV]))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable (not possible on every platform)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str | Path) -> Path:
    return atomic_write(path, lambda f: _torch_save(obj, f, Path(path)))


def _torch_save(obj, f, path: Path) -> None:
    """torch.save, whose write failures become OSError. Its zip writer reports a failed write
    (ENOSPC on a full disk) as RuntimeError "... unexpected pos ...", not as the OSError it was."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        if shutil.disk_usage(path.parent).free < 1 << 20:  # under 1 MiB left: the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
        raise OSError(errno.EIO, f"torch.save failed: {(str(e).strip().splitlines() or ['?'])[-1][:200]}") from e


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


# -- reading ------------------------------------------------------------------------------------
def _remedy(path: Path, what: str) -> str:
    """What to do about a damaged file: a training checkpoint has earlier ones, a weights file
    was copied or downloaded, a released ADM checkpoint comes from the paper's site."""
    if what == "checkpoint":
        return "delete it and resume from an earlier one"
    if (name := released_name(path)) is not None:
        return f"download it again ({RELEASE_URL}{name})"
    return "copy, export or download it again"


def read_file(path: str | Path, what: str = "checkpoint"):
    """torch.load(weights_only=True) whose failures are one-line GuidedErrors."""
    path = Path(path)
    if not path.exists():
        name = released_name(path)
        where = f" (download it from {RELEASE_URL}{name})" if name else ""
        raise GuidedError(f"{what} {path} does not exist{where}")
    if path.is_dir():
        raise GuidedError(f"{what} {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise GuidedError(f"{what} {path} is empty (0 bytes): {_remedy(path, what)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zipfile, pickle, EOF and storage errors of a damaged file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        fix = "" if what == "checkpoint" else f": {_remedy(path, what)}"  # (training skips to an older one)
        raise GuidedError(f"{what} {path} is truncated or corrupt ({why[:100]}){fix}") from None


def load_checkpoint(path: str | Path) -> dict:
    """A full training state written by `save_checkpoint`."""
    state = read_file(path)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise GuidedError(f"{path} is not a training checkpoint of this project (no '{CKPT_FORMAT}' header)")
    return state


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ckpt-*.pt in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint and its state; unreadable newer ones are skipped with a warning.
    None when there is none at all; a GuidedError when none of them can be read."""
    found = list_checkpoints(run_dir)
    errors = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except GuidedError as e:
            errors.append(str(e))
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    if errors:
        raise GuidedError(f"no readable checkpoint in {run_dir}: {errors[0]}")
    return None


# -- writing ------------------------------------------------------------------------------------
def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of writes that a killed run left half-done (.<name>.*.tmp)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:07d}.pt"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ckpt-<step>.pt atomically, then delete all but the newest `keep` (>= 1)."""
    path = atomic_save({"format": CKPT_FORMAT, "version": 1, "step": step, **state}, checkpoint_path(run_dir, step))
    for _, old in list_checkpoints(run_dir)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def write_run_files(run_dir: str | Path, cfg, label_map) -> None:
    """config.yaml and label_map.json, the files load_trained reads beside the weights."""
    try:
        atomic_write_text(Path(run_dir) / "config.yaml", to_yaml(cfg))
        if label_map is not None:
            atomic_write_text(Path(run_dir) / "label_map.json", json.dumps(label_map.to_dict(), indent=1) + "\n")
    except OSError as e:  # a read-only or full output folder
        raise GuidedError(f"cannot write into {run_dir}: {e.strerror or e}") from None


def export_weights(path: str | Path, state_dict: dict, *, kind: str, cfg, label_map=None, which: str = "model",
                   step: int = 0, dtype: str = "fp32", calibration: dict | None = None) -> Path:
    """A compact, self-contained weights file for sampling (fp32 or fp16 floats); a classifier's
    calibration (guided/calibration.py, Calibration.to_dict) travels in it."""
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
            return merge(structured(), OmegaConf.create(embedded))
        except OmegaConfBaseException as e:
            raise GuidedError(f"the config stored in {path} is unreadable: {e}") from None
    option = "--adm-flags" if kind == "unet" else "--classifier-flags"
    raise GuidedError(f"no config for {path}: it is a bare state dict, like the paper's released ADM checkpoints, "
                      f"which take their published flags with {option} (the nine released file names need none); "
                      f"a model trained here needs its config.yaml beside it")


def _label_map_for(path: Path, embedded: dict | None):
    from guided.data import LabelMap

    side = _beside(path, [f"{path.stem}.labels.json", "label_map.json"])
    if side is not None:
        return LabelMap.load(side)
    return LabelMap.from_dict(embedded) if embedded else None


def _infer_kind(state_dict: dict) -> str:
    return "unet" if any(k.startswith("output_blocks.") for k in clean_state_dict(state_dict)) else "classifier"


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
    return check_finite(clean_state_dict(_unpack(read_file(path, "weights file"), which, Path(path))["state_dict"]),
                        path)


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
    w = _unpack(read_file(path, "weights file"), which, path)
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
    from guided.networks.unet import EncoderUNetModel, UNetModel

    try:
        return UNetModel(cfg.model) if kind == "unet" else EncoderUNetModel(cfg.classifier)
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
    if w.get("calibration"):  # a classifier's temperatures per noise band (guided/calibration.py)
        from guided.guidance.calibration import Calibration
        model.calibration = Calibration.from_dict(w["calibration"])
    return model.to(device).eval(), cfg, label_map
