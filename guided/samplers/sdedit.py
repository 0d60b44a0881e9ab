"""SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic differential
equations"), once for every sampler: perturb a guide image to the level of t0 and run the reverse
process from there; with a mask, only its white region changes (the rest is the guide, put back on
its noised path after every step). `SDEdit` is the request, checked here once; `start` begins any
fixed-step sampler's levels from it (guided/samplers/levels.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from guided.diffusion.sde import expand_as
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

    def start(self, levels, model, noise, shape, x_T=None):
        """(x, levels, after_step) of an SDEdit run over `levels` (guided.samplers.levels.Levels): the
        guide noised to the start level, the levels from there on, and the mask's re-noising (None
        without a mask). The noise z is x_T, else the first draw of each sample's generator."""
        z = noise.randn(shape) if x_T is None else x_T.to(noise.device)
        if levels.kind == "chain":
            return self._chain_start(levels, z, noise)
        if levels.kind == "sde":
            return self._sde_start(levels, model.sde, z)
        raise GuidedError("SDEdit runs over fixed steps: use a sampler with --steps (ddpm, ddim, dpm++, "
                          "dpm++2m-sde, dpm++3m, edm or pc)")

    def _chain_start(self, levels, z, noise):
        """On a respaced chain: the guide noised to the chain's last level below the forward process's level
        at t0 (original timestep t0 T, [SDEdit] Sec. 3), so t0 means one noise level whatever the steps
        (karrasN, logsnrN and plain counts alike); with a mask, the region outside it re-noised to each
        step's level with fresh noise."""
        diffusion = levels.chain
        guide = self.image.to(z.device).expand_as(z)
        below = (diffusion.timestep_map < self.t0 * diffusion.num_original_steps).nonzero()
        start = int(below.max()) if len(below) else 0
        x = diffusion.q_sample(guide, torch.full((len(z),), start, device=z.device), z)
        levels = replace(levels, start=start)
        if self.mask is None:
            return x, levels, None
        mask = self.mask.to(z.device)

        def keep_outside(i, xi):
            if i == 0:
                known = guide
            else:
                known = diffusion.q_sample(guide, torch.full((len(xi),), i - 1, device=xi.device), noise.randn_like(xi))
            return mask * xi + (1 - mask) * known
        return x, levels, keep_outside

    def _sde_start(self, levels, sde, z):
        """On SDE time: sde_start from t0 in the levels' step count."""
        mask = None if self.mask is None else self.mask.to(z.device)
        x, times, project = sde_start(sde, self.image.to(z.device).expand_as(z), z, self.t0, levels.count, mask)
        sigmas = [float(s) for s in sde.marginal(torch.tensor(times, dtype=torch.float64))[1]]
        return x, replace(levels, times=times, sigmas=sigmas), project


def sde_start(sde, guide, z, t0: float, steps: int, mask=None):
    """SDEdit on SDE time ([SDEdit] Sec. 3): (x, times, project). x is the guide perturbed to t0 T,
    alpha x_g + sigma z; times run from t0 T to the SDE's eps in `steps` steps; with a mask, `project(x, s)`
    resets x outside it to the guide re-noised to time s with the same z (as the SDEdit code does; its
    mask marks the kept region instead), and to the guide at the end (s None); None without a mask."""
    t_start = t0 * sde.T
    if t_start <= sde.eps:
        raise GuidedError(f"SDEdit t0 = {t0} is below the SDE's end time eps = {sde.eps}: raise t0")

    def noised(t):  # the guide perturbed to time t, x_t ~ p_0t(. | x_g)
        a, std = sde.marginal(t)
        return expand_as(a, z) * guide + expand_as(std, z) * z

    def project(x, s):  # keep the unmasked region on the guide's noised path
        return mask * x + (1 - mask) * (guide if s is None else noised(s))

    times = torch.linspace(t_start, sde.eps, steps).tolist()
    x = noised(torch.full((len(z),), float(t_start), device=z.device, dtype=z.dtype))
    return x, times, None if mask is None else project
