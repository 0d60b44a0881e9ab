"""The training losses of the score models, and the timestep samplers.

`training_losses` is the reference's: the eps-MSE (Ho et al. eq. 14), plus,
when the variance is learned, the variational-bound term L_vb on the variance
with a stop-gradient on the mean (the hybrid loss, Nichol & Dhariwal eq. 16).
`dsm_loss` is continuous-time denoising score matching on an SDE ([SDE]: Song
et al. 2021), `ncsn_loss` NCSN's over a noise ladder ([NCSN]: Song & Ermon 2019).
The objects that choose among them are in guided.diffusion.objectives.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from guided.diffusion.gaussian import GaussianDiffusion
from guided.diffusion.sde import expand_as
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


def training_losses(diffusion: GaussianDiffusion, model, x0, t, noise=None, model_kwargs=None,
                    mse_weight=None) -> dict:
    """Per-example losses: dict(loss, mse[, vb]). `model(x_t, timesteps, **kwargs)`
    is called on the original timesteps of the indices t. `mse_weight` (per example):
    the weight of the mse term in `loss` (a recipe's weighting; `mse` is logged unweighted)."""
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
    weighted = terms["mse"] if mse_weight is None else terms["mse"] * mse_weight
    terms["loss"] = weighted + terms.get("vb", 0.0)
    return terms


def _randn_like(x, generator):
    if hasattr(generator, "randn_like"):  # one generator per sample (guided.samplers.discrete.SampleNoise)
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def dsm_loss(score_fn, sde, x0, *, weighting="sigma2", reduce="sum", eps=1e-5, generator=None):
    """Continuous-time denoising score matching ([SDE] eq. 7), t ~ U(eps, T):
    lambda(t) E ||s(x_t, t) + z / sigma_t||^2 with x_t = alpha_t x0 + sigma_t z.
    weighting='sigma2': lambda = sigma_t^2, i.e. ||sigma_t s + z||^2 (score_sde's
    default); 'likelihood': lambda = g(t)^2 (Song et al. 2021b, a bound on the NLL).
    reduce: 'sum' or 'mean' over data dimensions; the batch is averaged.
    """
    if weighting not in ("sigma2", "likelihood"):
        raise GuidedError(f"unknown DSM weighting {weighting!r}: use 'sigma2' or 'likelihood'")
    if reduce not in ("sum", "mean"):
        raise GuidedError(f"unknown reduction {reduce!r}: use 'sum' or 'mean'")
    n = x0.shape[0]
    t = torch.rand(n, generator=generator, device=x0.device, dtype=x0.dtype) * (sde.T - eps) + eps
    z = _randn_like(x0, generator)
    alpha, sigma = sde.marginal(t)
    xt = expand_as(alpha, x0) * x0 + expand_as(sigma, x0) * z
    s = score_fn(xt, t)
    if weighting == "sigma2":
        per = (expand_as(sigma, x0) * s + z) ** 2
    else:
        per = expand_as(sde.diffusion(t) ** 2, x0) * (s + z / expand_as(sigma, x0)) ** 2
    per = per.reshape(n, -1)
    return (per.sum(dim=1) if reduce == "sum" else per.mean(dim=1)).mean()


def ncsn_loss(model, sigmas, x0, *, generator=None):
    """NCSN's DSM over the noise ladder ([NCSN] Sec. 4.2): a level index i ~ U{0..L-1}
    per sample, x~ = x0 + sigma_i z, loss 1/2 sigma_i^2 ||s(x~, i) + z / sigma_i||^2
    = 1/2 ||sigma_i s + z||^2 (lambda(sigma) = sigma^2), averaged over the batch.
    `model(x, labels)` is the label-conditioned network (see score.ncsn_score)."""
    sigmas = torch.as_tensor(sigmas, device=x0.device, dtype=x0.dtype)
    labels = torch.randint(0, sigmas.numel(), (x0.shape[0],), generator=generator, device=x0.device)
    sigma = expand_as(sigmas[labels], x0)
    z = _randn_like(x0, generator)
    s = model(x0 + sigma * z, labels)
    return 0.5 * ((sigma * s + z) ** 2).reshape(x0.shape[0], -1).sum(dim=1).mean()


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
        """Tensors (a checkpoint is read with torch.load(weights_only=True))."""
        return dict(loss_history=torch.from_numpy(self.loss_history.copy()),
                    loss_counts=torch.from_numpy(self.loss_counts.copy()))

    def load_state_dict(self, state):
        self.loss_history[...] = np.asarray(state["loss_history"])
        self.loss_counts[...] = np.asarray(state["loss_counts"])


class LogNormalSampler(UniformSampler):
    """EDM's training noise levels on a discrete chain: ln sigma ~ N(mean, std^2) (Karras et al.
    2022, Table 1: P_mean -1.2, P_std 1.2), each draw taken to the timestep whose sigma_t =
    sqrt((1 - abar_t) / abar_t) is nearest in ln sigma. Drawn exactly as that, by the probability
    mass each timestep receives; the weights are 1, not importance weights: the recipe changes
    which levels are trained, as EDM's does."""

    def __init__(self, sigmas: torch.Tensor, mean: float = -1.2, std: float = 1.2):
        super().__init__(len(sigmas))
        if not (std > 0 and math.isfinite(mean)):
            raise GuidedError(f"train.objective.lognormal_std must be > 0 and lognormal_mean finite, not {std}, {mean}")
        log_s = np.log(np.asarray(sigmas, dtype=np.float64))
        edges = np.concatenate([[-np.inf], (log_s[1:] + log_s[:-1]) / 2, [np.inf]])  # nearest in ln sigma
        cdf = np.array([0.5 * math.erfc(-(e - mean) / (std * math.sqrt(2))) for e in edges])
        self.mass = np.diff(cdf)

    def weights(self) -> np.ndarray:
        return self.mass

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        t, _ = super().sample(batch_size, device, generator)
        return t, torch.ones(batch_size, device=device)


def create_schedule_sampler(name: str, num_timesteps: int, sigmas=None, mean=-1.2, std=1.2) -> UniformSampler:
    """The timestep sampler `name`; lognormal needs the chain's `sigmas` (one per timestep)."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name in ("loss-second-moment", "loss_second_moment", "loss-aware"):
        return LossSecondMomentResampler(num_timesteps)
    if name == "lognormal" and sigmas is not None:
        return LogNormalSampler(sigmas, mean, std)
    raise GuidedError(f"unknown schedule sampler {name!r}; choose uniform, loss-second-moment or lognormal")
