"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021) as arrays and pure functions.

A `GaussianDiffusion` holds the schedule of one (possibly respaced) process:
betas, cumulative alphas, posterior coefficients, and `timestep_map`, the
original timestep of every respaced index. Its methods take tensors and the
network's OUTPUT, never the network: the caller runs the model (on the
original timestep, `diffusion.model_t(t)`) and hands the result over.
Coefficients are computed in float64, as the reference does, and cast to the
input's dtype on extraction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from guided.errors import GuidedError
from guided.speed import DeviceCopies
from guided.diffusion import scheduler_config as sc

VARIANCES = ("fixed_large", "fixed_small", "learned_range", "learned")
LOSSES = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def betas_for_alpha_bar(n: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = 1 - alpha_bar((i+1)/n) / alpha_bar(i/n), clipped at max_beta (Nichol & Dhariwal eq. 17)."""
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def named_beta_schedule(name: str, n: int) -> np.ndarray:
    if name == "linear":  # Ho et al., rescaled so any step count spans the same range
        scale = 1000 / n
        if scale * 0.02 >= 1:  # beta_T >= 1: alpha-bar reaches 0 and every coefficient after it is NaN
            raise GuidedError(f"the linear noise schedule needs more than 20 diffusion steps (its last beta is "
                              f"0.02 * 1000 / steps), got {n}: use more steps or the cosine schedule")
        return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)
    if name == "cosine":  # alpha_bar(t) = cos^2(((t + s) / (1 + s)) pi / 2), s = 0.008
        return betas_for_alpha_bar(n, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise GuidedError(f"unknown noise schedule {name!r}; choose linear or cosine")


def space_timesteps(num_timesteps: int, section_counts, steps_offset: int = 0) -> list[int]:
    """The original timesteps kept by a respacing (the reference's `space_timesteps`).

    "ddimN": an integer stride giving exactly N steps; "N" or "a,b,c": the
    process cut into equal sections, each strided to its count; "quadN": N
    steps quadratically spaced, t_i ~ (i / (N-1))^2 (the DDIM paper's "quadratic"
    selection, dense at low noise where few-step solvers need it); "leadingN",
    "trailingN", "linspaceN": diffusers' set_timesteps spacings (Lin et al. 2024,
    Table 2; `steps_offset` shifts leading). Sorted list.
    """
    text = str(section_counts).strip() if section_counts not in (None, "") else str(num_timesteps)
    if text.startswith(_DIFFUSERS_SPACINGS):
        return _diffusers_steps(num_timesteps, text, steps_offset)
    if text.startswith("quad"):
        return _quadratic_steps(num_timesteps, text)
    if text.startswith("ddim"):
        try:
            want = int(text[4:])
        except ValueError:
            raise GuidedError(f"respacing {text!r}: expected ddimN, e.g. ddim25") from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        if want == num_timesteps:
            return list(range(num_timesteps))
        raise GuidedError(f"respacing {text!r}: no integer stride gives exactly {want} of {num_timesteps} steps")
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise GuidedError(f"respacing {text!r}: expected a step count, counts like 10,15,20, or ddimN") from None
    if any(c < 1 for c in counts):
        raise GuidedError(f"respacing {text!r}: every section needs at least one step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise GuidedError(f"respacing {text!r} asks for {count} steps from a section of only {size} "
                              f"(the process has {num_timesteps} steps)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


_DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")


def _diffusers_steps(num_timesteps: int, text: str, offset: int) -> list[int]:
    """diffusers' DDPMScheduler.set_timesteps, same integers (same numpy arithmetic)."""
    kind = next(k for k in _DIFFUSERS_SPACINGS if text.startswith(k))
    try:
        n = int(text[len(kind):])
    except ValueError:
        raise GuidedError(f"respacing {text!r}: expected {kind}N, e.g. {kind}50") from None
    if not 1 <= n <= num_timesteps:
        raise GuidedError(f"respacing {text!r}: {kind}N needs 1 <= N <= {num_timesteps}")
    if kind == "linspace":
        steps = np.linspace(0, num_timesteps - 1, n).round().astype(np.int64)
    elif kind == "leading":
        steps = (np.arange(0, n) * (num_timesteps // n)).round().astype(np.int64) + offset
    else:
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / n)).astype(np.int64) - 1
    steps = sorted(set(int(s) for s in steps))
    if steps[0] < 0 or steps[-1] >= num_timesteps:
        raise GuidedError(f"respacing {text!r} with steps_offset {offset} reaches timestep {steps[-1]} "
                          f"of a {num_timesteps}-step process")
    return steps


SIGMA_SCHEDULES = ("karras", "logsnr")  # respacings chosen on the noise level (sigma_steps)
KARRAS_SIGMA_MAX, KARRAS_RHO = 80.0, 7.0  # Karras et al. 2022 (EDM) Table 1 and eq. 5


def sigma_steps(alphas_cumprod, text: str) -> list[int]:
    """The original timesteps of a respacing chosen on sigma = sqrt((1 - abar) / abar), for any sampler:
    "karrasN": N levels on Karras et al.'s rho = 7 schedule (EDM eq. 5),
    sigma_i = (smax^(1/rho) + i / (N-1) (smin^(1/rho) - smax^(1/rho)))^rho, and "logsnrN": N levels
    uniform in log-SNR = -2 log sigma (Lu et al. 2022's uniform-lambda steps). smin is the chain's
    smallest sigma, smax its largest capped at EDM's 80; each level goes to the timestep of nearest
    log sigma (EDM's round_sigma for discrete-time models), nudged apart where two would coincide."""
    name = next(n for n in SIGMA_SCHEDULES if text.startswith(n))
    try:
        want = int(text[len(name):])
    except ValueError:
        raise GuidedError(f"respacing {text!r}: expected {name}N, e.g. {name}20") from None
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    log_sigma = 0.5 * np.log((1 - abar) / abar)
    if not 2 <= want <= len(abar):
        raise GuidedError(f"respacing {text!r}: {name}N needs 2 <= N <= {len(abar)}")
    lo, hi = log_sigma[0], min(log_sigma[-1], math.log(KARRAS_SIGMA_MAX))
    ramp = np.linspace(0, 1, want)
    if name == "karras":
        a, b = math.exp(hi) ** (1 / KARRAS_RHO), math.exp(lo) ** (1 / KARRAS_RHO)
        levels = np.log((a + ramp * (b - a)) ** KARRAS_RHO)
    else:
        levels = hi + ramp * (lo - hi)
    steps = sorted(int(np.abs(log_sigma - v).argmin()) for v in levels)
    return _distinct(steps, len(abar))


def _distinct(steps: list[int], num_timesteps: int) -> list[int]:
    """Sorted timesteps made strictly increasing within [0, num_timesteps), moving as few as needed."""
    for i in range(1, len(steps)):
        steps[i] = max(steps[i], steps[i - 1] + 1)
    steps[-1] = min(steps[-1], num_timesteps - 1)
    for i in range(len(steps) - 2, -1, -1):
        steps[i] = min(steps[i], steps[i + 1] - 1)
    return steps


def _quadratic_steps(num_timesteps: int, text: str) -> list[int]:
    try:
        want = int(text[4:])
    except ValueError:
        raise GuidedError(f"respacing {text!r}: expected quadN, e.g. quad25") from None
    if not 2 <= want <= num_timesteps:
        raise GuidedError(f"respacing {text!r}: quadN needs 2 <= N <= {num_timesteps}")
    steps = [round((i / (want - 1)) ** 2 * (num_timesteps - 1)) for i in range(want)]
    return _distinct(steps, num_timesteps)  # kept distinct where the parabola is flat


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    betas: torch.Tensor  # float64 [T]
    timestep_map: torch.Tensor  # int64 [T]: respaced index -> original timestep
    num_original_steps: int
    variance: str = "fixed_large"
    predict_xstart: bool = False
    loss: str = "mse"
    rescale_timesteps: bool = False

    def __post_init__(self):
        if self.variance not in VARIANCES:
            raise GuidedError(f"unknown variance {self.variance!r}; choose one of {', '.join(VARIANCES)}")
        if self.loss not in LOSSES:
            raise GuidedError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        b = self.betas.numpy()
        a = np.cumprod(1.0 - b)
        a_prev = np.append(1.0, a[:-1])
        post_var = b * (1.0 - a_prev) / (1.0 - a)
        arrays = dict(
            alphas_cumprod=a, alphas_cumprod_prev=a_prev,
            sqrt_alphas_cumprod=np.sqrt(a), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - a),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / a), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / a - 1),
            posterior_variance=post_var,
            # the first posterior variance is 0: log-clip it to the second (Ho et al.)
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=b * np.sqrt(a_prev) / (1.0 - a),
            posterior_mean_coef2=(1.0 - a_prev) * np.sqrt(1.0 - b) / (1.0 - a),
            log_betas=np.log(b),
            # fixed_large uses beta_t, with the posterior variance at t=0 for a better decoder
            large_variance=np.append(post_var[1], b[1:]),
            log_large_variance=np.log(np.append(post_var[1], b[1:])),
        )
        for name, value in arrays.items():
            object.__setattr__(self, name, _t(value))
        object.__setattr__(self, "on_device", DeviceCopies())

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    # -- indexing -----------------------------------------------------------------------
    def extract(self, arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] broadcast to `like`'s shape, in its dtype."""
        out = self.on_device(arr, t.device)[t].to(like.dtype if like.is_floating_point() else torch.float32)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def original_t(self, t: torch.Tensor) -> torch.Tensor:
        """The original timestep of respaced index t."""
        return self.on_device(self.timestep_map, t.device)[t]

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep a network (score model or classifier) receives for respaced index t."""
        orig = self.original_t(t)
        if self.rescale_timesteps:
            return orig.float() * (1000.0 / self.num_original_steps)
        return orig

    # -- forward process ----------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4)."""
        return self.extract(self.sqrt_alphas_cumprod, t, x0) * x0 + \
            self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7)."""
        mean = self.extract(self.posterior_mean_coef1, t, x_t) * x0 + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self.extract(self.posterior_variance, t, x_t), \
            self.extract(self.posterior_log_variance_clipped, t, x_t)

    def xstart_from_eps(self, x_t, t, eps):
        return self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - \
            self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_xstart(self, x_t, t, x0):
        return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / \
            self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    # -- reverse process ----------------------------------------------------------------
    def split_output(self, model_output, x_t):
        """(mean output, variance output or None): learned variances use channels C..2C."""
        c = x_t.shape[1]
        if self.variance in ("learned_range", "learned"):
            if model_output.shape[1] != 2 * c:
                raise GuidedError(f"a learned variance needs {2 * c} output channels, the model gives "
                                  f"{model_output.shape[1]} (learn_sigma mismatch)")
            return model_output[:, :c], model_output[:, c:]
        return model_output[:, :c], None

    def p_variance(self, var_values, x_t, t):
        """(variance, log-variance) of p(x_{t-1} | x_t); learned_range interpolates
        log beta_t and log beta~_t with v in [-1, 1] (Nichol & Dhariwal eq. 15)."""
        if self.variance == "learned":
            return torch.exp(var_values), var_values
        if self.variance == "learned_range":
            min_log = self.extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self.extract(self.log_betas, t, x_t)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_var), log_var
        if self.variance == "fixed_small":
            return self.extract(self.posterior_variance, t, x_t), self.extract(self.posterior_log_variance_clipped, t, x_t)
        return self.extract(self.large_variance, t, x_t), self.extract(self.log_large_variance, t, x_t)

    def p_mean_variance(self, model_output, x_t, t, clip_denoised=True, denoised_fn=None):
        """The model's p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart."""
        out, var_values = self.split_output(model_output, x_t)
        variance, log_variance = self.p_variance(var_values, x_t, t)
        pred_xstart = out if self.predict_xstart else self.xstart_from_eps(x_t, t, out)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)


def _scheduler_chain(path, steps: int, respacing):
    """(betas, respacing, steps_offset) of a diffusers scheduler config (guided/diffusion/scheduler_config.py)."""

    cfg = sc.read(path)
    base = sc.betas(cfg)
    if len(base) != steps:
        raise GuidedError(f"diffusion.steps={steps} but the scheduler config {path} has {len(base)} "
                          f"timesteps: set diffusion.steps={len(base)}")
    spacing, offset = sc.spacing(cfg)
    text = str(respacing).strip() if respacing not in (None, "") else ""
    return base, (f"{spacing}{text}" if text.isdigit() else text), offset


def create_diffusion(cfg, timestep_respacing: str | None = None) -> GaussianDiffusion:
    """A (respaced) process from a DiffusionConfig node. Respacing keeps the
    chosen timesteps and recomputes betas so that the kept alpha-bars are
    unchanged: beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}} (Nichol & Dhariwal sec. 4)."""
    respacing = cfg.timestep_respacing if timestep_respacing is None else timestep_respacing
    if cfg.steps < 2:  # the posterior variance at t = 0 is clipped to the one at t = 1 (Ho et al.)
        raise GuidedError(f"diffusion.steps must be at least 2, got {cfg.steps}")
    betas_from, offset = getattr(cfg, "betas_from", None), 0
    if betas_from:  # a diffusers scheduler's betas; a plain count takes its own spacing
        base, respacing, offset = _scheduler_chain(betas_from, cfg.steps, respacing)
    else:
        base = named_beta_schedule(cfg.noise_schedule, cfg.steps)
    abar = np.cumprod(1.0 - base)
    text = str(respacing or "").strip()
    kept = sigma_steps(abar, text) if text.startswith(SIGMA_SCHEDULES) else space_timesteps(cfg.steps, respacing, offset)
    if len(kept) < 2:  # one step would keep only t = 0, a denoiser of almost clean images
        raise GuidedError(f"respacing {respacing!r} keeps a single step (timestep {kept[0]}), which cannot "
                          f"denoise from pure noise: use at least 2 steps (--steps 2)")
    last, betas = 1.0, []
    for i in kept:
        betas.append(1 - abar[i] / last)
        last = abar[i]
    return GaussianDiffusion(_t(np.array(betas)), torch.tensor(kept, dtype=torch.int64), cfg.steps,
                             variance=cfg.variance, predict_xstart=cfg.predict_xstart, loss=cfg.loss,
                             rescale_timesteps=cfg.rescale_timesteps)
