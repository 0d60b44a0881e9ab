"""A trained network adapted once to the interface every sampler and guidance term uses.

As k-diffusion's `DiscreteEpsDDPMDenoiser` adapts an eps model on discrete timesteps once, a
`ScoreModel` carries what samplers need of a network and its noise process:
- the NETWORK TIME, the one time variable outside a sampler's own loop: the timesteps every
  network (score model, classifier, guides) sees: original diffusion steps, or ladder indices;
- `sigma_of(t)`: the noise level of a network time (guidance intervals and schedules), and
  `sigma_range`, the levels the network was trained on;
- `sde` and `model_time(t)`: the continuous process the score samplers run on, and its clock;
- `process(steps)`: the respaced discrete process of the paper's samplers (eps models only),
  built once per respacing; the learned variance travels in the network's output channels;
- `score(model_fn)`, `denoiser(model_fn)`, `prior(noise)`: score, x0 estimate and x_T;
- `space`: the data space its samples live in (guided.diffusion.space: pixels in [-1, 1] here), where
  x0 may be clipped and how the sampler's output becomes images;
- on a discrete VP chain, its levels: `timestep(sigma)` (the nearest original timestep), `level(t)`
  (its sigma) and `network_time(t)` (what the networks see at an original timestep).
The guided denoiser every sampler receives wraps one of these (guided/guidance/denoiser.py).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional

import torch

from guided.diffusion.gaussian import GaussianDiffusion, create_diffusion
from guided.diffusion.ladder import Ladder
from guided.diffusion.sde import DiscreteVPSDE, expand_as, lerp_table
from guided.diffusion.space import PIXELS, DataSpace
from guided.errors import GuidedError
from guided.speed import DeviceCopies

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ScoreModel:
    """Base: `kind` is "eps" (a noise predictor on a VP chain) or "score" (an NCSN ladder)."""

    kind = "eps"
    learned_variance = False
    space: DataSpace = PIXELS

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_time(self, t_sde: torch.Tensor) -> torch.Tensor:
        """The network time of continuous SDE time t."""
        raise NotImplementedError

    def score(self, model_fn: ModelFn, clip: bool = False):
        """s(x, t) = grad log p_t(x) at SDE time t of the network function model_fn(x, t_net)."""
        raise NotImplementedError

    def denoiser(self, model_fn: ModelFn) -> Optional[Callable]:
        """x0_hat(x, t_net), or None where the network gives no x0 estimate."""
        return None

    def prior(self, noise, shape) -> torch.Tensor:
        """x_T ~ p_T: N(0, I), or N(0, sigma_max^2 I) on a VE ladder."""
        return noise.randn(shape)

    def process(self, steps: str) -> GaussianDiffusion:
        raise GuidedError("this model has no discrete diffusion: use a score sampler (langevin or pc)")


class EpsModel(ScoreModel):
    """An eps network on the discrete VP chain of `diffusion_cfg` (the paper's models and DSM eps models).
    Its SDE is the chain's interpolating VP SDE (guided.diffusion.sde.DiscreteVPSDE)."""

    def __init__(self, diffusion_cfg, learned_variance: bool = False):
        self.cfg, self.learned_variance = diffusion_cfg, learned_variance
        self.base = create_diffusion(diffusion_cfg, "")  # every original timestep: built once
        self.sde = DiscreteVPSDE(self.base.alphas_cumprod)
        self.sigma_of = vp_sigma(self.base.alphas_cumprod)
        sig = ((1 - self.base.alphas_cumprod) / self.base.alphas_cumprod).sqrt()
        self.sigma_range = (float(sig[0]), float(sig[-1]))
        self.process = lru_cache(maxsize=8)(self._process)
        abar = self.base.alphas_cumprod.to(torch.float64)
        self.log_sigmas = 0.5 * torch.log((1 - abar) / abar)  # of every original timestep, float64

    def timestep(self, sigma: float) -> int:
        """The original timestep of nearest log sigma."""
        return int((self.log_sigmas - math.log(sigma)).abs().argmin())

    def level(self, t: int) -> float:
        """sigma = sqrt((1 - abar_t) / abar_t) of original timestep t."""
        return math.exp(float(self.log_sigmas[t]))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the networks see at original timesteps t (rescaled to 1000 steps where the config says)."""
        return self.base.model_t(t)

    def _process(self, steps: str) -> GaussianDiffusion:
        return create_diffusion(self.cfg, str(steps))

    def model_time(self, t_sde):
        return self.sde.model_time(t_sde)

    def score(self, model_fn, clip=False):
        """-eps / sigma_t; with `clip`, eps re-derived from the x0 prediction clipped to [-1, 1]."""
        return score_from_eps(lambda x, t: clipped_eps(model_fn, self.sde, x, t, clip), self.sde)

    def denoiser(self, model_fn):
        """x0_hat(x_t) = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. eq. 15)."""
        def denoise(x, t):
            sigma = self.sigma_of(t).view(-1, *[1] * (x.dim() - 1))  # sqrt((1 - abar) / abar)
            eps = model_fn(x, t)[:, :x.shape[1]]
            return x * (1 + sigma**2).sqrt() - sigma * eps  # = (x - sqrt(1 - abar) eps) / sqrt(abar)
        return denoise


def vp_sigma(alphas_cumprod) -> Callable[[torch.Tensor], torch.Tensor]:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) of a VP chain at (possibly fractional) original timesteps,
    log abar interpolated linearly between steps as guided.diffusion.sde.DiscreteVPSDE does."""
    log_abar, on_device = torch.as_tensor(alphas_cumprod, dtype=torch.float64).log().float(), DeviceCopies()

    def sigma_of(t):
        table = on_device(log_abar, t.device)  # copied over once, not in every step
        return torch.expm1(-lerp_table(table, t)).clamp(min=0).sqrt()
    return sigma_of


def score_from_eps(eps_fn, sde):
    """s(x, t) = -eps(x, t) / sigma_t: a noise predictor is a scaled score
    (x_t = alpha_t x_0 + sigma_t eps gives grad log p_0t = -eps / sigma_t;
    Song et al. 2021 App. B; Lu et al. 2022 Sec. 2)."""

    def score_fn(x, t):
        _, sigma = sde.marginal(t)
        return -eps_fn(x, t) / expand_as(sigma, x)

    return score_fn


def eps_model_score(model, sde, y=None, model_kwargs=None):
    """Score at SDE time t of an eps network `model(x, timesteps[, y=...])` on `sde`'s clock
    (sde.model_time); a learned-sigma model's second C output channels are dropped."""
    kwargs = dict(model_kwargs or {}, **({} if y is None else {"y": y}))
    return score_from_eps(lambda x, t: clipped_eps(lambda v, s: model(v, s, **kwargs), sde, x, t, False), sde)


def clipped_eps(model_fn, sde, x, t, clip: bool):
    """The network's eps at SDE time t; with `clip`, re-derived from the x0 prediction clipped to
    [-1, 1]. Without it (the score-SDE reference's arithmetic), where alpha_t is tiny (the start of
    a cosine schedule) the x0 behind eps lies far outside the data range."""
    out = model_fn(x, sde.model_time(t))
    c = x.shape[1]
    if out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
        raise GuidedError(f"eps model returned shape {tuple(out.shape)} for input {tuple(x.shape)}: "
                          f"expected {c} (eps) or {2 * c} (eps + learned sigma) channels")
    eps = out[:, :c]
    if not clip:
        return eps
    alpha, sigma = (expand_as(v, x) for v in sde.marginal(t))
    x0 = ((x - sigma * eps) / alpha).clamp(-1, 1)
    return (x - alpha * x0) / sigma


class LadderModel(ScoreModel):
    """An NCSN score network on a noise ladder (Song & Ermon 2019): network time is the ladder index,
    the continuous process the VE SDE spanning the ladder."""

    kind = "score"

    def __init__(self, ladder: Ladder):
        self.ladder, self.sde = ladder, ladder.sde
        self.sigma_range = (float(ladder.sigmas[-1]), float(ladder.sigmas[0]))

    def sigma_of(self, t):
        return self.ladder.sigma_of(t)

    def model_time(self, t_sde):
        return self.ladder.index_of_time(t_sde)

    def score(self, model_fn, clip=False):
        return lambda x, t: model_fn(x, self.model_time(t))

    def prior(self, noise, shape):
        return noise.randn(shape) * self.sde.sigma_max



def noise_process(model: ScoreModel) -> dict:
    """What a network was trained on, to compare a guide network's with the model's: the kind, the noise
    levels of its network times (float64: every original timestep of a VP chain, or the NCSN ladder),
    and the time convention of its network input."""
    if isinstance(model, LadderModel):
        return {"kind": "score", "sigmas": model.ladder.sigmas.double(), "time": "ladder index"}
    rescaled = bool(getattr(model.cfg, "rescale_timesteps", False))
    return {"kind": "eps", "sigmas": model.log_sigmas.exp(), "time": "rescaled to 1000" if rescaled else "timestep"}


def same_process(a: dict, b: dict) -> Optional[str]:
    """None where two networks' noise processes agree, else what differs, in words."""
    if a["kind"] != b["kind"]:
        name = {"eps": "a VP chain (an eps model's)", "score": "an NCSN noise ladder"}
        return f"it was trained on {name[a['kind']]}, the model on {name[b['kind']]}"
    if len(a["sigmas"]) != len(b["sigmas"]):
        return f"it was trained on {len(a['sigmas'])} noise levels, the model on {len(b['sigmas'])}"
    if not torch.allclose(a["sigmas"], b["sigmas"], rtol=1e-4, atol=1e-8):
        i = int(((a["sigmas"] - b["sigmas"]).abs() / b["sigmas"].abs().clamp(min=1e-12)).argmax())
        return (f"its noise levels differ from the model's (level {i}: sigma {float(a['sigmas'][i]):.4g} against "
                f"{float(b['sigmas'][i]):.4g}): another noise schedule")
    if a["time"] != b["time"]:
        return f"its network time is {a['time']}, the model's {b['time']}"
    return None
