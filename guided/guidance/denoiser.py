"""The one guided denoiser every sampler receives: a model adapted once, its guidance applied once, inside.

k-diffusion wraps any model once into a denoiser D(x, sigma); EDM2 applies guidance once, inside
`denoise`. A `GuidedDenoiser` is that object for this project. It holds
- the adapted model (guided.diffusion.models.ScoreModel: its kind, noise process, network time,
  valid sigma range, learned variance and data space),
- `output(x, t)`: the network on the time it sees, labels bound in, the MIXING terms applied to its
  eps (classifier-free, autoguidance: guided.guidance.terms.Guidance.model_fn),
- `grad(x, t)`: the sum of the GRADIENT terms, s * grad_x log p(y | x_t) (classifier, x0-classifier),
  or None,
- the one clip setting (`clip`, `percentile`, `clip_guided`), applied only where the data space has a
  range (guided.diffusion.space),
and gives the guided prediction in the forms samplers use, each derived here once:
- `correct(eps, grad, std)`: Algorithm 2 of Dhariwal & Nichol, eps_hat = eps - sqrt(1 - abar_t) s grad
  (std = sqrt(1 - abar_t), the noise's scale in x_t); every eps-form sampler calls it;
- `x0(x, sigma)`: D(x; sigma), the guided data prediction in EDM's variables x = x_t / sqrt(abar_t);
- `score(x, t)`: the guided score on continuous SDE time, s(x_t) + s grad log p(y | x_t)
  (the same correction in score form: -eps_hat / std = -eps / std + s grad).
The DDPM mean shift of Algorithm 1 (mu + Sigma s grad) stays the paper's, in guided/samplers/discrete.py.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from guided.diffusion.models import ScoreModel
from guided.diffusion.sde import expand_as


def correct(eps: torch.Tensor, grad: torch.Tensor, std) -> torch.Tensor:
    """Algorithm 2 (Dhariwal & Nichol 2021): eps_hat = eps - sqrt(1 - abar_t) * s grad_x log p(y | x_t)."""
    return eps - std * grad


class GuidedDenoiser:
    """See the module docstring. `preview(share done, x0 estimate)`, if given, is what samplers report to."""

    def __init__(self, model: ScoreModel, output: Callable, grad: Optional[Callable] = None, *, clip: str = "static",
                 percentile: float = 0.995, clip_guided: bool = False, preview: Optional[Callable] = None):
        self.model, self.output, self.grad = model, output, grad
        self.clip, self.percentile, self.clip_guided = clip, percentile, clip_guided
        self.preview, self.calls = preview, 0

    @property
    def space(self):
        return self.model.space

    @property
    def clips(self) -> bool:
        """Whether x0 is clipped at all (a setting other than none, in a space with a range)."""
        return self.clip != "none" and self.space.bounded

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        return self.space.clip(x0, self.clip, self.percentile)

    def x0(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma) of an eps model on its discrete chain (Karras et al. 2022's variables): the level
        rounded to the chain's nearest timestep, eps guided by `correct`, the prediction clipped."""
        t = self.model.timestep(sigma)
        sigma = self.model.level(t)
        alpha = 1 / math.sqrt(1 + sigma**2)  # sqrt(abar_t)
        x_vp = x * alpha
        t_net = self.model.network_time(torch.full((len(x),), t, device=x.device, dtype=torch.long))
        eps = self.output(x_vp, t_net)[:, :x.shape[1]].to(x.dtype)
        if self.grad is not None:
            eps = correct(eps, self.grad(x_vp, t_net).to(x.dtype), sigma * alpha)  # sigma alpha = sqrt(1 - abar)
        self.calls += 1
        return self.clip_x0(x - sigma * eps)

    __call__ = x0

    def round(self, sigma: float) -> float:
        """EDM's round_sigma: the chain's level nearest sigma."""
        return self.model.level(self.model.timestep(sigma))

    def score(self, t_report: Optional[Callable] = None) -> Callable:
        """The guided score s(x, t) on SDE time; x0 clipped behind it with clip_guided (pc, ode).
        `t_report(t)`, with a preview, gives the share done at t (Tweedie's x0 is previewed)."""
        model, grad = self.model, self.grad
        score = model.score(self.output, clip=self.clips and self.clip_guided)
        if grad is not None:
            plain = score
            score = lambda x, t: plain(x, t) + 1.0 * grad(x, model.model_time(t))  # noqa: E731
        return score if self.preview is None else reporting(score, model.sde, self.preview)


def reporting(score, sde, preview):
    """The score, also reporting at each evaluation Tweedie's denoised estimate
    E[x0 | x_t] = (x_t + sigma_t^2 s(x_t, t)) / alpha_t (Efron 2011) with the share of [T, eps] done."""
    def score_fn(x, t):
        s = score(x, t)
        alpha, sigma = (expand_as(v, x) for v in sde.marginal(t))
        preview(float((sde.T - t[0]) / (sde.T - sde.eps)), (x + sigma**2 * s) / alpha)
        return s
    return score_fn
