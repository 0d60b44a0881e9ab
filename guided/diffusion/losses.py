"""Training objectives of the ADM score model and the timestep samplers.

`training_losses` is the reference's: the eps-MSE (Ho et al. eq. 14), plus,
when the variance is learned, the variational-bound term L_vb on the variance
with a stop-gradient on the mean (the hybrid loss, Nichol & Dhariwal eq. 16).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from guided.diffusion.gaussian import GaussianDiffusion
from guided.errors import GuidedError


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of 8-bit data in [-1, 1] under a Gaussian discretised into
    bins of width 2/255, with open edge bins (Ho et al. sec. 3.3)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_terms_bpd(diffusion: GaussianDiffusion, model_output, x0, x_t, t, clip_denoised=False):
    """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits/dim, and the
    decoder NLL -log p(x_0|x_1) at t = 0 (Ho et al. eq. 5)."""
    true_mean, _, true_log_var = diffusion.q_posterior(x0, x_t, t)
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    nll = mean_flat(nll) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(diffusion: GaussianDiffusion, model, x0, t, noise=None, model_kwargs=None) -> dict:
    """Per-example losses: dict(loss, mse[, vb]). `model(x_t, timesteps, **kwargs)`
    is called on the original timesteps of the indices t."""
    model_kwargs = model_kwargs or {}
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = diffusion.q_sample(x0, t, noise)
    output = model(x_t, diffusion.model_t(t), **model_kwargs)
    if diffusion.loss in ("kl", "rescaled_kl"):
        loss = vb_terms_bpd(diffusion, output, x0, x_t, t)
        if diffusion.loss == "rescaled_kl":
            loss = loss * diffusion.num_timesteps
        return dict(loss=loss, vb=loss)
    mean_out, var_values = diffusion.split_output(output, x_t)
    terms = {}
    if var_values is not None:
        # The bound trains only the variance: the mean output is detached.
        frozen = torch.cat([mean_out.detach(), var_values], dim=1)
        terms["vb"] = vb_terms_bpd(diffusion, frozen, x0, x_t, t)
        if diffusion.loss == "rescaled_mse":
            terms["vb"] = terms["vb"] * (diffusion.num_timesteps / 1000.0)
    target = x0 if diffusion.predict_xstart else noise
    terms["mse"] = mean_flat((target - mean_out) ** 2)
    terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
    return terms


class UniformSampler:
    """t ~ U{0..T-1}, importance weights 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def weights(self) -> np.ndarray:
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        w = torch.from_numpy(self.weights())
        p = w / w.sum()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (len(p) * p[t])
        return t.to(device, non_blocking=True), weights.float().to(device, non_blocking=True)

    def update_with_all_losses(self, ts, losses):
        pass


class LossSecondMomentResampler(UniformSampler):
    """Importance sampling of t by sqrt(E[L_t^2]) over the last `history` losses
    per timestep, mixed with a little of the uniform (Nichol & Dhariwal sec. 3.3)."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history, self.uniform_prob = history, uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w = w / w.sum() * (1 - self.uniform_prob)
        return w + self.uniform_prob / len(w)

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self.loss_counts[t] == self.history:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self):
        return dict(loss_history=self.loss_history.copy(), loss_counts=self.loss_counts.copy())

    def load_state_dict(self, state):
        self.loss_history[...] = state["loss_history"]
        self.loss_counts[...] = state["loss_counts"]


def create_schedule_sampler(name: str, num_timesteps: int) -> UniformSampler:
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name in ("loss-second-moment", "loss_second_moment", "loss-aware"):
        return LossSecondMomentResampler(num_timesteps)
    raise GuidedError(f"unknown schedule sampler {name!r}; choose uniform or loss-second-moment")
