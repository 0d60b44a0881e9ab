"""SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic differential
equations"), once for every sampler: perturb a guide image to the level of t0 and run the reverse
process from there; with a mask, only its white region changes (the rest is the guide, put back on
its noised path after every step). `SDEdit` is the request, checked here once; the sampler registry
starts each sampler family from it (`discrete_start`, and guided.samplers.continuous.sdedit).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from guided.errors import GuidedError


def check_t0(t0) -> float:
    """t0, the share of the forward process to perturb the guide by, in (0, 1]."""
    if isinstance(t0, bool) or not isinstance(t0, (int, float)) or not 0 < t0 <= 1:
        raise GuidedError(f"--t0 must be in (0, 1], got {t0}")
    return float(t0)


def check_mask(mask, like: torch.Tensor) -> torch.Tensor:
    """A mask broadcastable to the guide, values in [0, 1] (1 = may change)."""
    mask = torch.as_tensor(mask, dtype=like.dtype, device=like.device)
    try:
        ok = torch.broadcast_shapes(mask.shape, like.shape) == like.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise GuidedError(f"SDEdit mask shape {tuple(mask.shape)} does not broadcast to the guide's {tuple(like.shape)}")
    if mask.min() < 0 or mask.max() > 1:
        raise GuidedError("SDEdit mask values must lie in [0, 1] (1 = edit)")
    return mask


@dataclass
class SDEdit:
    image: torch.Tensor  # [C, H, W] in [-1, 1]
    t0: float
    mask: Optional[torch.Tensor] = None  # [1, H, W] in [0, 1], 1 = may change

    def __post_init__(self):
        self.t0 = check_t0(self.t0)
        if self.mask is not None:
            self.mask = check_mask(self.mask, self.image)

    @classmethod
    def of(cls, init) -> Optional["SDEdit"]:
        """An SDEdit from the dict form {"image", "t0"[, "mask"]} (or itself, or None)."""
        if init is None or isinstance(init, SDEdit):
            return init
        return cls(init["image"], init["t0"], init.get("mask"))

    def discrete_start(self, diffusion, x_T: torch.Tensor, noise):
        """(x, start index, after_step) on a respaced discrete process: the guide noised to the
        index nearest t0 of the chain; with a mask, the region outside it re-noised to each
        step's level with fresh noise."""
        guide = self.image.to(x_T.device).expand_as(x_T)
        start = max(0, min(diffusion.num_timesteps - 1, round(self.t0 * diffusion.num_timesteps) - 1))
        x = diffusion.q_sample(guide, torch.full((len(x_T),), start, device=x_T.device), x_T)
        if self.mask is None:
            return x, start, None
        mask = self.mask.to(x_T.device)

        def keep_outside(i, xi):
            if i == 0:
                known = guide
            else:
                known = diffusion.q_sample(guide, torch.full((len(xi),), i - 1, device=xi.device), noise.randn_like(xi))
            return mask * xi + (1 - mask) * known
        return x, start, keep_outside
