"""The noise levels a sampler runs over, made from a `--steps` spec in one place.

A `Levels` is the list of noise levels sigma, noisiest first, with what each sampler needs to reach
them: the respaced discrete chain (`chain`, whose timestep_map gives the original timesteps the
networks see: respacings "100", "10,15,20", "ddim25", "quad25", diffusers' "trailing10", and the
noise-level schedules "karras20" and "logsnr20"), the SDE times of a plain count (`times`: pc), or
the model's NCSN ladder (`ladder`: langevin). An adaptive sampler (ode) has no list: it picks its own.
SDEdit starts the same levels partway (`start`: the chain index or the first SDE time); see
guided/samplers/sdedit.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from guided.errors import GuidedError

KINDS = ("chain", "sde", "ladder", "adaptive")


@dataclass
class Levels:
    kind: str  # one of KINDS: how the sampler's --steps is read
    sigmas: list  # decreasing noise levels, ending in 0 where the last step lands on the data
    chain: object = None  # guided.diffusion.gaussian.GaussianDiffusion of a respacing ("chain")
    times: Optional[list] = None  # SDE times, T first ("sde")
    ladder: Optional[torch.Tensor] = None  # the model's ladder, float64 ("ladder")
    count: Optional[int] = None  # the plain step count of an "sde" sampler
    start: Optional[int] = None  # SDEdit: the chain index to start from (default: the last)

    @property
    def steps(self) -> int:
        """How many levels the sampler steps through."""
        return len(self.sigmas) - (1 if self.sigmas and self.sigmas[-1] == 0 else 0)


def chain_sigmas(model, chain) -> list:
    """sqrt((1 - abar_t) / abar_t) of the chain's original timesteps, noisiest first, then 0."""
    abar = model.base.alphas_cumprod
    ts = chain.timestep_map.flip(0).tolist()
    return [math.sqrt((1 - float(abar[t])) / float(abar[t])) for t in ts] + [0.0]


def plain_count(name: str, steps) -> int:
    if not str(steps).isdigit() or int(steps) < 1:  # "quad25" and the like are respacings
        raise GuidedError(f"--sampler {name} takes a plain step count (e.g. --steps 1000), not {steps!r}")
    return int(steps)


def make_levels(model, kind: str, steps, name: str = "") -> Levels:
    """The levels of `steps` for a sampler whose steps are of `kind` on the adapted `model`; a spec the
    sampler cannot take is refused in one line (a respaced chain is built once and cached by the model)."""
    if kind == "chain":
        chain = model.process(str(steps))
        return Levels(kind, chain_sigmas(model, chain), chain=chain)
    if kind == "sde":
        n = plain_count(name, steps)
        sde = model.sde
        times = torch.linspace(sde.T, sde.eps, n).tolist()
        return Levels(kind, [float(s) for s in sde.marginal(torch.tensor(times, dtype=torch.float64))[1]],
                      times=times, count=n)
    if kind == "ladder":
        return Levels(kind, model.ladder.sigmas.tolist(), ladder=model.ladder.sigmas)
    return Levels(kind, [])
