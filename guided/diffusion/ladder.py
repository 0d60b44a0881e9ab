"""NCSN's noise ladder (Song & Ermon 2019, cited [NCSN]): the one place its noise levels live.

A ladder is a decreasing sequence of L noise levels sigma_0 > ... > sigma_{L-1}; networks
trained on it (the NCSN score model and its classifier) see the index i of their level.
Samplers reach it through the VE SDE that spans it (`sde`), whose continuous time t maps to
the nearest rung (`index_of_time`); guidance reads the level of an index (`sigma_of`); the
classifier trainer perturbs x = x_0 + sigma_i z (`perturb`).
"""
from __future__ import annotations

import math

import torch

from guided.diffusion.sde import VESDE
from guided.errors import GuidedError
from guided.speed import DeviceCopies


def geometric_sigmas(sigma_max, sigma_min, L):
    """NCSN's noise ladder: L levels from sigma_max down to sigma_min with a
    constant ratio ([NCSN] Sec. 4.2). float64 tensor [L]."""
    if not 0 < sigma_min < sigma_max or not isinstance(L, int) or L < 2:
        raise GuidedError("geometric_sigmas needs 0 < sigma_min < sigma_max and an integer L >= 2")
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), L, dtype=torch.float64).exp()


class Ladder:
    """A decreasing noise ladder (float64 `sigmas`, largest first) and its VE SDE."""

    def __init__(self, sigmas):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if sigmas.numel() < 2 or not torch.all(sigmas[1:] < sigmas[:-1]):
            raise GuidedError("sigmas must be a decreasing 1-D ladder with >= 2 levels")
        self.sigmas = sigmas
        self.sde = VESDE(float(sigmas[-1]), float(sigmas[0]))
        self._log, self._f32, self.on_device = sigmas.log(), sigmas.float(), DeviceCopies()

    @classmethod
    def geometric(cls, sigma_max: float, sigma_min: float, levels: int) -> "Ladder":
        return cls(geometric_sigmas(sigma_max, sigma_min, levels))

    @property
    def num_levels(self) -> int:
        return len(self.sigmas)

    def sigma_of(self, index: torch.Tensor) -> torch.Tensor:
        """sigma (float32) of the ladder indices networks see."""
        return self.on_device(self._f32, index.device)[index.long()]

    def index_of_time(self, t: torch.Tensor) -> torch.Tensor:
        """The rung nearest in log sigma to VE time t, sigma(t) = sigma_min (sigma_max/sigma_min)^t."""
        log_sigma = self.sde.sigma(t.double()).log().to("cpu")
        return (log_sigma[:, None] - self._log[None, :]).abs().argmin(dim=1).to(t.device)

    def perturb(self, x0: torch.Tensor, index: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x = x_0 + sigma_i z ([NCSN] eq. 5's perturbation)."""
        return x0 + self.sigma_of(index).view(-1, *[1] * (x0.dim() - 1)) * z
