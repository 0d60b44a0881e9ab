"""A diffusers scheduler config (`scheduler_config.json`) read as the project's discrete VP chain.

No diffusers import: the file is JSON. What the project takes from it:
- the betas, exactly as diffusers' DDPMScheduler / DDIMScheduler build them (in float32, then
  used in float64 here): `linear` (beta_start..beta_end, Ho et al. 2020), `scaled_linear`
  (linear in sqrt(beta)), `squaredcos_cap_v2` (alpha_bar = cos^2(((t + s) / (1 + s)) pi / 2),
  Nichol & Dhariwal 2021 eq. 17) or `trained_betas`;
- `variance_type` as a variance of guided.diffusion.gaussian (fixed_small: the posterior variance
  beta~_t, fixed_large: beta_t, learned_range: Nichol & Dhariwal eq. 15);
- `prediction_type` (epsilon, v_prediction, sample), converted to eps by the network adapter
  (guided/networks/diffusers.py);
- the timestep spacing of its `set_timesteps` (leading + steps_offset, trailing, linspace), the
  respacing a plain step count gets for such a model (guided.diffusion.gaussian.space_timesteps).
`DiffusionConfig.betas_from` names the file (or a diffusers pipeline folder holding it).
"""
from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from guided.errors import GuidedError

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")
# diffusers' variance_type -> the project's variance; the *_log forms draw the same noise
VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
             "fixed_large_log": "fixed_large", "learned_range": "learned_range", "learned": "learned"}
# the scheduler classes whose config describes a discrete VP chain of betas (the ones read here); any
# other (ScoreSdeVeScheduler, EDMEulerScheduler, ... : VE or sigma-parameterised processes) is refused by name
VP_CHAIN_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler",
                       "DDPMParallelScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                       "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "DEISMultistepScheduler",
                       "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                       "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                       "LMSDiscreteScheduler", "SASolverScheduler", "TCDScheduler", "LCMScheduler")
# the shipped configs: guided/configs in an install, configs/ in a checkout
CONFIGS_DIRS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parents[2] / "configs")


def scheduler_file(path) -> Path:
    """The scheduler_config.json of `path`: the file itself, or the one in a pipeline folder
    (scheduler/scheduler_config.json) or a scheduler folder. A relative path that does not exist
    from here is looked up in the shipped configs/ folder."""
    p = Path(path)
    if not p.exists() and not p.is_absolute():
        p = next((d / p for d in CONFIGS_DIRS if (d / p).exists()), p)
    for candidate in (p, p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json"):
        if candidate.is_file():
            return candidate
    if not p.exists():
        raise GuidedError(f"{path}: no such scheduler config (a diffusers scheduler_config.json or pipeline folder)")
    raise GuidedError(f"{path} holds no diffusers scheduler config (scheduler/scheduler_config.json)")


@lru_cache(maxsize=16)
def _read(path: str) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GuidedError(f"{path} is not a readable scheduler config (JSON): {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or "num_train_timesteps" not in cfg and "beta_schedule" not in cfg:
        raise GuidedError(f"{path} is not a diffusers scheduler config (no num_train_timesteps or beta_schedule)")
    return check(cfg, path)


def read(path) -> dict:
    """The validated scheduler config of a file or pipeline folder, with diffusers' defaults filled in."""
    return _read(str(scheduler_file(path)))


def check(cfg: dict, where) -> dict:
    """diffusers' defaults filled in; what the project cannot run refused in one line."""
    out = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "variance_type": "fixed_small", "prediction_type": "epsilon",
           "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
           "rescale_betas_zero_snr": False, **{k: v for k, v in cfg.items() if v is not None or k == "trained_betas"}}
    kind = cfg.get("_class_name")
    if kind is not None and kind not in VP_CHAIN_SCHEDULERS:
        raise GuidedError(f"{where}: a {kind} config is not a discrete VP chain of betas (the process guided samples); "
                          f"use a model whose scheduler is one of DDPMScheduler, DDIMScheduler, "
                          f"DPMSolverMultistepScheduler, ...")
    if out["prediction_type"] not in PREDICTIONS:
        raise GuidedError(f"{where}: prediction_type {out['prediction_type']!r} is not supported; "
                          f"one of {', '.join(PREDICTIONS)}")
    if out["trained_betas"] is None and out["beta_schedule"] not in SCHEDULES:
        raise GuidedError(f"{where}: beta_schedule {out['beta_schedule']!r} is not supported; "
                          f"one of {', '.join(SCHEDULES)} or trained_betas")
    if out["variance_type"] not in VARIANCES:
        raise GuidedError(f"{where}: variance_type {out['variance_type']!r} is not supported; "
                          f"one of {', '.join(VARIANCES)}")
    if out["timestep_spacing"] not in SPACINGS:
        raise GuidedError(f"{where}: timestep_spacing {out['timestep_spacing']!r} is not supported; "
                          f"one of {', '.join(SPACINGS)}")
    if out["rescale_betas_zero_snr"]:
        raise GuidedError(f"{where}: rescale_betas_zero_snr gives alpha_bar_T = 0 (an infinite noise level), "
                          f"which the eps parameterisation cannot sample from")
    return out


def betas(cfg: dict) -> np.ndarray:
    """The scheduler's betas as diffusers builds them (float32 values), in float64."""
    n = int(cfg["num_train_timesteps"])
    if cfg["trained_betas"] is not None:
        b = np.asarray(cfg["trained_betas"], dtype=np.float32)
    elif cfg["beta_schedule"] == "linear":
        b = _linspace32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        b = _linspace32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2 (Nichol & Dhariwal eq. 17, beta capped at 0.999)
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        b = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=np.float32)
    b = b.astype(np.float64)
    if b.ndim != 1 or len(b) < 2 or not np.all((b > 0) & (b < 1)):
        raise GuidedError("the scheduler's betas must be at least 2 values in (0, 1)")
    return b


def _linspace32(a, b, n) -> np.ndarray:
    import torch  # torch's float32 linspace, bit for bit the values diffusers uses

    return torch.linspace(float(a), float(b), n, dtype=torch.float32).numpy()


CLIPPING_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler",
                       "DDPMParallelScheduler")  # the classes with a clip_sample setting (default True)


def clips_by_default(path) -> bool:
    """Whether diffusers' scheduler of this file clips x0 to [-1, 1] in its step: its clip_sample where its
    class has the setting (default True), False for a class without it (DPM-Solver, Euler, ...)."""
    raw = json.loads(Path(scheduler_file(path)).read_text())
    kind = raw.get("_class_name")
    return bool(raw.get("clip_sample", True)) if kind is None or kind in CLIPPING_SCHEDULERS else False


def spacing(cfg: dict) -> tuple[str, int]:
    """(timestep_spacing, steps_offset) of set_timesteps."""
    return cfg["timestep_spacing"], int(cfg["steps_offset"])


def diffusion_values(path, cfg: dict) -> dict:
    """DiffusionConfig values of a model sampled on this scheduler (guided.config.DiffusionConfig)."""
    return {"steps": len(betas(cfg)), "variance": VARIANCES[cfg["variance_type"]], "betas_from": str(path)}
