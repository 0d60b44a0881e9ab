"""Continuous-time forward SDEs of the score-based family.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations" (ICLR; cited below as [SDE]). Every SDE here is linear,

    dx = f(t) x dt + g(t) dw        (the linear case of [SDE] eq. 5),

so its perturbation kernel is Gaussian: x_t = alpha_t x_0 + sigma_t z with
z ~ N(0, I). `marginal(t)` returns (alpha_t, sigma_t); samplers need nothing
else from an SDE besides the drift, the diffusion, the prior and `model_time`
(the value a trained network expects as its time input).

No SDE knows anything about networks: they take and return tensors only.
Time `t` is always a float tensor of shape [N] (one time per sample).
"""

import math

import torch

from guided.errors import GuidedError
from guided.speed import DeviceCopies


def expand_as(v, x):
    """Reshape a per-sample vector v [N] to broadcast against x [N, ...]."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def lerp_table(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """table[t] at (possibly fractional) original timesteps t, linear between steps, clamped to the ends:
    the one interpolation of a discrete chain's log alpha-bar (guided.diffusion.models.vp_sigma, the
    diffusers adapter's abar)."""
    tf = t.to(table.dtype).clamp(0, len(table) - 1)
    lo = tf.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    return torch.lerp(table[lo], table[hi], tf - lo)


def _flat_sum(x):
    return x.reshape(x.shape[0], -1).sum(dim=1)


class SDE:
    """Base class. Subclasses define `marginal`, `drift` and `diffusion`."""

    T = 1.0  # end time of the forward process
    eps = 1e-3  # smallest time a sampler integrates down to ([SDE] App. C)
    likelihood_eps = 1e-5  # start of the likelihood ODE (score_sde's default)

    def marginal(self, t):
        """(alpha_t, sigma_t) of the kernel p_0t(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)."""
        raise NotImplementedError

    def drift(self, x, t):
        """f(x, t) of the forward SDE (eq. 5)."""
        raise NotImplementedError

    def diffusion(self, t):
        """g(t) of the forward SDE (eq. 5), shape [N]."""
        raise NotImplementedError

    def model_time(self, t):
        """The time input a network trained for this SDE expects."""
        return t

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32):
        """x_T ~ p_T, the tractable prior ([SDE] Sec. 3.1)."""
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        """log N(z; 0, I) per sample, shape [N]."""
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi) - 0.5 * _flat_sum(z**2)

    def transition(self, t, s):
        """(a, std) of p(x_t | x_s) = N(a x_s, std^2 I) for s < t.

        For a linear SDE x_t = (alpha_t / alpha_s) x_s + noise independent of
        x_s, so Var = sigma_t^2 - a^2 sigma_s^2 (both sides' variances given x_0).
        """
        a_t, s_t = self.marginal(t)
        a_s, s_s = self.marginal(s)
        a = a_t / a_s
        return a, (s_t**2 - a**2 * s_s**2).clamp(min=0).sqrt()

    def reverse_drift(self, x, t, score, probability_flow=False):
        """Drift of the reverse-time SDE, f - g^2 s ([SDE] eq. 6), or of the
        probability-flow ODE, f - g^2 s / 2 ([SDE] eq. 13)."""
        g2 = expand_as(self.diffusion(t) ** 2, x)
        return self.drift(x, t) - (0.5 if probability_flow else 1.0) * g2 * score


class VPSDE(SDE):
    """Variance-preserving SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dw ([SDE] eq. 11).

    schedule='linear': beta(t) = beta_min + t (beta_max - beta_min), the
    continuous limit of DDPM's linear betas; log alpha_t = -t^2 (b1-b0)/4 - t b0/2
    ([SDE] App. B). schedule='cosine': Nichol & Dhariwal 2021 eq. 17,
    alpha_t^2 = f(t)/f(0) with f(t) = cos^2((t+s)/(1+s) pi/2), so
    beta(t) = -2 d log alpha/dt = pi/(1+s) tan((t+s)/(1+s) pi/2). The cosine
    schedule ends at T = 0.9946 (DPM-Solver's choice, alpha_T^2 ~ 7e-5): at
    t = 1 alpha is 0 and log alpha diverges.
    """

    def __init__(self, beta_min=0.1, beta_max=20.0, schedule="linear", cosine_s=0.008,
                 time_scale=999.0):
        if schedule not in ("linear", "cosine"):
            raise GuidedError(f"unknown VP schedule {schedule!r}: use 'linear' or 'cosine'")
        if schedule == "linear" and not 0 < beta_min < beta_max:
            raise GuidedError(f"VP SDE needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if schedule == "cosine" and not cosine_s > 0:
            raise GuidedError(f"cosine schedule offset s must be > 0, got {cosine_s}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.schedule, self.cosine_s = schedule, float(cosine_s)
        self.time_scale = float(time_scale)  # score_sde feeds 999 t to continuous VP nets
        if schedule == "cosine":
            self.T = 0.9946

    def log_alpha(self, t):
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self.cosine_s
        lf = torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2))
        return lf - math.log(math.cos(s / (1 + s) * math.pi / 2))

    def beta(self, t):
        if self.schedule == "linear":
            return self.beta_min + t * (self.beta_max - self.beta_min)
        s = self.cosine_s
        return math.pi / (1 + s) * torch.tan((t + s) / (1 + s) * math.pi / 2)

    def marginal(self, t):
        # [SDE] App. B: mean e^{-1/2 int beta} x_0, variance 1 - e^{-int beta}.
        log_a = self.log_alpha(t)
        return log_a.exp(), (-torch.expm1(2 * log_a)).clamp(min=0).sqrt()

    def drift(self, x, t):
        return -0.5 * expand_as(self.beta(t), x) * x

    def diffusion(self, t):
        return self.beta(t).sqrt()

    def model_time(self, t):
        return t * self.time_scale

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod):
        """The VP SDE of a trained discrete diffusion (see `DiscreteVPSDE`)."""
        return DiscreteVPSDE(alphas_cumprod)


class DiscreteVPSDE(VPSDE):
    """A VP SDE interpolating a discrete diffusion's table alphas_cumprod[0..N-1].

    As DPM-Solver's NoiseScheduleVP('discrete') (Lu et al. 2022, App. D):
    step i sits at t_i = (i+1)/N and log alpha_t is piecewise linear through
    (t_i, log(alphas_cumprod[i]) / 2), extended linearly beyond the ends (and
    capped at 0 so that alpha <= 1 near t = 0). beta(t) = -2 d log alpha/dt is
    then piecewise constant. A network trained on the N-step chain takes the
    fractional timestep (t - 1/N) N, so an ADM epsilon network (float
    timesteps) is a score model of this SDE. T = 1; eps = 1/N (timestep 0) for
    sampling and likelihood alike.
    """

    def __init__(self, alphas_cumprod):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise GuidedError("alphas_cumprod must have >= 2 entries, all in (0, 1]")
        if not torch.all(ac[1:] < ac[:-1]):
            raise GuidedError("alphas_cumprod must be strictly decreasing")
        self.N = ac.numel()
        self.t_grid = torch.arange(1, self.N + 1, dtype=torch.float64) / self.N
        self.log_alpha_grid = 0.5 * ac.log()
        self.slopes = torch.diff(self.log_alpha_grid) / torch.diff(self.t_grid)
        self.schedule, self.T = "discrete", 1.0
        self.eps = self.likelihood_eps = 1.0 / self.N  # below t_0 sigma_t collapses to 0
        self.on_device = DeviceCopies()

    def _segment(self, t):
        i = torch.searchsorted(self.on_device(self.t_grid, t.device), t.double(), right=True) - 1
        return i.clamp(0, self.N - 2)

    def log_alpha(self, t):
        i = self._segment(t)
        grid, la, k = (self.on_device(v, t.device) for v in (self.t_grid, self.log_alpha_grid, self.slopes))
        out = la[i] + k[i] * (t.double() - grid[i])
        return out.clamp(max=0).to(t.dtype)

    def beta(self, t):
        return (-2 * self.on_device(self.slopes, t.device)[self._segment(t)]).to(t.dtype)

    def model_time(self, t):
        return (t - 1.0 / self.N) * self.N


class SubVPSDE(VPSDE):
    """sub-VP SDE dx = -beta/2 x dt + sqrt(beta (1 - e^{-2 int_0^t beta})) dw ([SDE] eq. 12).

    Same mean as VP; sigma_t = 1 - alpha_t^2 ([SDE] App. B), always below VP's.
    """

    def marginal(self, t):
        log_a = self.log_alpha(t)
        return log_a.exp(), -torch.expm1(2 * log_a)

    def diffusion(self, t):
        # 1 - e^{-2 int beta} = 1 - alpha_t^4
        return (self.beta(t) * -torch.expm1(4 * self.log_alpha(t))).sqrt()


class VESDE(SDE):
    """Variance-exploding SDE dx = sqrt(d sigma^2/dt) dw ([SDE] eq. 9, App. C).

    sigma(t) = sigma_min (sigma_max/sigma_min)^t, so
    g(t) = sigma(t) sqrt(2 log(sigma_max/sigma_min)); alpha_t = 1, and the prior
    is N(0, sigma_max^2 I). Networks (NCSN++) take sigma_t as time input.
    """

    eps = 1e-5

    def __init__(self, sigma_min=0.01, sigma_max=50.0):
        if not 0 < sigma_min < sigma_max:
            raise GuidedError(f"VE SDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t):
        return self.sigma_min * torch.exp(t * self._log_ratio)

    def t_of_sigma(self, sigma):
        """Inverse of sigma(t): the time at which the noise level is sigma."""
        return torch.log(torch.as_tensor(sigma) / self.sigma_min) / self._log_ratio

    def marginal(self, t):
        return torch.ones_like(t), self.sigma(t)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def model_time(self, t):
        return self.sigma(t)

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32):
        return self.sigma_max * super().prior_sample(shape, generator, device, dtype)

    def prior_logp(self, z):
        d = z[0].numel()
        return super().prior_logp(z / self.sigma_max) - d * math.log(self.sigma_max)


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def make_sde(name, **kwargs):
    """Build an SDE by name: 'vp', 'subvp', 've', or 'cosine' (a cosine VP)."""
    if name == "cosine":
        return VPSDE(schedule="cosine", **kwargs)
    if name not in SDES:
        raise GuidedError(f"unknown SDE {name!r}: use one of vp, subvp, ve, cosine")
    return SDES[name](**kwargs)
