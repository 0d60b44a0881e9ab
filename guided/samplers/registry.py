"""Every sampler once, with its traits, and the one way to run any of them on a `ScoreModel`.

`SAMPLERS[name]` is a `Sampler`: how to run it (`run(job) -> x_0`), whether it takes a fixed step
count or chooses its own, whether it is stochastic, which model kinds it serves (eps networks,
NCSN score ladders), and when the extra clip of the guided x0 (`clip_guided`) changes it.
A `Job` holds one batch's request: the adapted model, the guided model function and gradient
function (guided/guidance), the per-sample noise, the steps, SDEdit and a preview callback.
Three families run here: the paper's samplers on a respaced discrete chain (guided/samplers/
discrete.py, exact to the paper's code), the few-step samplers on the noise levels of that chain
(guided/samplers/fewstep.py: DPM-Solver++(2M) SDE, DPM-Solver++(3M), EDM's stochastic sampler) and
the score samplers on continuous SDE time (guided/samplers/continuous.py); all report previews as
(share done, x0 estimate).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from guided.diffusion.models import ScoreModel
from guided.diffusion.sde import expand_as
from guided.errors import GuidedError
from guided.samplers import continuous as ss
from guided.samplers import discrete, fewstep
from guided.samplers.sdedit import SDEdit


@dataclass
class Job:
    model: ScoreModel
    model_fn: Callable  # network output on network time, labels and mixing terms bound in
    cond_fn: Optional[Callable]  # sum of the gradient terms, or None
    noise: object  # guided.samplers.discrete.SampleNoise: one generator per sample
    shape: tuple
    steps: Optional[str] = None
    eta: float = 0.0
    clip_denoised: bool = True
    clip_guided: bool = False
    ddpm_form: str = "mean"
    extra: dict = field(default_factory=dict)  # sampler-specific settings (snr, rtol, ...)
    precision: str = "fp32"
    sdedit: Optional[SDEdit] = None
    x_T: Optional[torch.Tensor] = None
    progress: bool = False
    preview: Optional[Callable] = None  # preview(share done in (0, 1], x0 estimate)


@dataclass(frozen=True)
class Sampler:
    name: str
    run: Callable[[Job], torch.Tensor]
    kinds: tuple  # ScoreModel.kind values it serves
    adaptive: Optional[str] = None  # how it chooses its own steps; None = a fixed count (--steps)
    stochastic: bool = True
    clip_guided: str = "never"  # when the extra clip of the guided x0 changes it: never | always | score form
    plain_count: bool = False  # its --steps is a plain count, not a respacing
    keywords: Optional[Callable[[Job], dict]] = None  # a discrete sampler's own keywords (eta, guidance form, ...)

    def check_steps(self, model: ScoreModel, steps, sdedit=None) -> Optional[int]:
        """Refuse steps the sampler cannot take, before any file is written (a respaced process is built
        and cached); the count of the score samplers (None where they choose their own)."""
        if not self.plain_count and self.adaptive is None:
            model.process(str(steps))
            return None
        if self.adaptive is not None and sdedit is None:
            return None
        if not str(steps).isdigit() or int(steps) < 1:  # "quad25" and the like are respacings
            raise GuidedError(f"--sampler {self.name} takes a plain step count (e.g. --steps 1000), not {steps!r}")
        return int(steps)

    def clips(self, ddpm_form: str = "mean") -> bool:
        """Whether the extra clip of the guided x0 (clip_guided) changes this sampler."""
        return self.clip_guided == "always" or (self.clip_guided == "score form" and ddpm_form == "score")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def discrete_inputs(name: str, job: Job):
    """(diffusion, keywords) with which the discrete sampler `name` runs `job` (also for checking one step)."""
    diffusion = job.model.process(str(job.steps))
    kw = dict(noise=job.noise, clip_denoised=job.clip_denoised, progress=job.progress, cond_fn=job.cond_fn,
              **SAMPLERS[name].keywords(job))
    return diffusion, kw


def _discrete(name: str, fn):
    """Run a sampler of guided/samplers/discrete.py on the model's respaced chain."""
    def run(job: Job) -> torch.Tensor:
        x = job.model.prior(job.noise, job.shape) if job.x_T is None else job.x_T.to(job.noise.device)
        diffusion, kw = discrete_inputs(name, job)
        if job.sdedit is not None:
            x, kw["start_index"], kw["after_step"] = job.sdedit.discrete_start(diffusion, x, job.noise)
        if job.preview is not None:
            n = kw.get("start_index", diffusion.num_timesteps - 1) + 1
            kw["callback"] = lambda i, x_i, x0: job.preview((n - i) / n, x0)
        with autocast(job.noise.device, job.precision):
            out = fn(diffusion, job.model_fn, x, **kw)
        return out.float()
    return run


def guided_score(job: Job):
    """The guided score of SDE time: the model's score plus the gradient terms at network time."""
    model = job.model
    score = model.score(job.model_fn, clip=job.clip_denoised and job.clip_guided)
    if job.cond_fn is not None:
        plain = score
        score = lambda x, t: plain(x, t) + 1.0 * job.cond_fn(x, model.model_time(t))  # noqa: E731
    return score if job.preview is None else reporting(score, model.sde, job.preview)


def reporting(score, sde, preview):
    """The score, also reporting at each evaluation the share of [T, eps] done and Tweedie's
    denoised estimate E[x0 | x_t] = (x_t + sigma_t^2 s(x_t, t)) / alpha_t (Efron 2011)."""
    def score_fn(x, t):
        s = score(x, t)
        alpha, sigma = (expand_as(v, x) for v in sde.marginal(t))
        preview(float((sde.T - t[0]) / (sde.T - sde.eps)), (x + sigma**2 * s) / alpha)
        return s
    return score_fn


def _continuous(name: str, solve: Callable):
    """Run a score sampler of guided/samplers/continuous.py; SDEdit runs the reverse SDE from t0."""
    def run(job: Job) -> torch.Tensor:
        spec, score, sde = SAMPLERS[name], guided_score(job), job.model.sde
        steps = spec.check_steps(job.model, job.steps, job.sdedit)
        if job.sdedit is not None:
            e, device = job.sdedit, job.noise.device
            guide = e.image.to(device).expand(len(job.noise.generators), *e.image.shape)
            return ss.sdedit(score, sde, guide, steps=steps, t0=e.t0, mask=None if e.mask is None else e.mask.to(device),
                             generator=job.noise, progress=job.progress).float()
        x_T = job.model.prior(job.noise, job.shape) if job.x_T is None else job.x_T
        with autocast(job.noise.device, job.precision):
            x = solve(job, score, sde, x_T.to(job.noise.device), steps)
        return x.float().clamp(-1, 1)
    return run


def _fewstep(name: str):
    """Run a few-step sampler of guided/samplers/fewstep.py on the levels of the model's respaced chain."""
    run = fewstep.runner(name)

    def run_cast(job: Job) -> torch.Tensor:
        with torch.no_grad(), autocast(job.noise.device, job.precision):  # guidance takes its own gradients
            return run(job)
    return run_cast


def _pc(job, score, sde, x_T, steps):
    return ss.pc_sampler(score, sde, x_T, steps=steps, generator=job.noise, progress=job.progress, **job.extra)


def _ode(job, score, sde, x_T, steps):
    return ss.ode_sampler(score, sde, x_T, generator=job.noise, progress=job.progress, **job.extra)


def _langevin(job, score, sde, x_T, steps):
    return ss.annealed_langevin(score, sde, x_T, sigmas=job.model.ladder.sigmas, generator=job.noise,
                                progress=job.progress, **job.extra)


def _score_form(job: Job) -> dict:
    return {"clip_guided": job.clip_guided}  # see discrete.guided_p_mean_variance


def _ddpm_keywords(job: Job) -> dict:
    kw = {"guidance_form": job.ddpm_form}
    return {**kw, **_score_form(job)} if job.ddpm_form == "score" else kw


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddpm", _discrete("ddpm", discrete.ddpm), ("eps",), clip_guided="score form", keywords=_ddpm_keywords),
    Sampler("ddim", _discrete("ddim", discrete.ddim), ("eps",), stochastic=False, clip_guided="always",  # unless eta > 0
            keywords=lambda job: {"eta": job.eta, **_score_form(job)}),
    Sampler("dpm++", _discrete("dpm++", discrete.dpmpp_2m), ("eps",), stochastic=False, clip_guided="always",
            keywords=_score_form),
    Sampler("dpm++2m-sde", _fewstep("dpm++2m-sde"), ("eps",)),
    Sampler("dpm++3m", _fewstep("dpm++3m"), ("eps",), stochastic=False),
    Sampler("edm", _fewstep("edm"), ("eps",)),
    Sampler("pc", _continuous("pc", _pc), ("eps", "score"), clip_guided="always", plain_count=True),
    Sampler("ode", _continuous("ode", _ode), ("eps",), adaptive="adaptive RK45, rtol = atol = 1e-5", stochastic=False,
            clip_guided="always"),
    Sampler("langevin", _continuous("langevin", _langevin), ("score",), adaptive="the model's noise ladder"),
)}


DEFAULT = {"eps": "ddpm", "score": "langevin"}  # the sampler of each model kind when none is asked for


def sampler_for(name: str, model: ScoreModel) -> Sampler:
    """The registry's sampler of that name, refused in one line where the model cannot serve it."""
    if name not in SAMPLERS:
        raise GuidedError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    if model.kind not in spec.kinds:
        serves = serving(model.kind)
        if model.kind == "score":
            raise GuidedError(f"an NCSN model (a noise-conditional score network) cannot use the {name} sampler, "
                              f"which needs an eps-prediction model: use --sampler {' or '.join(reversed(serves))}")
        raise GuidedError(f"annealed Langevin dynamics needs an NCSN model (train.objective=ncsn); "
                          f"for this eps-prediction model use {', '.join(serves[:-1])} or {serves[-1]}")
    return spec


def serving(kind: str) -> tuple:
    """The samplers that serve a model kind ("eps" or "score"), in registry order."""
    return tuple(name for name, s in SAMPLERS.items() if kind in s.kinds)


def clip_guided_samplers() -> tuple:
    """The samplers the extra clip always changes."""
    return tuple(s for s in SAMPLERS if SAMPLERS[s].clip_guided == "always")
