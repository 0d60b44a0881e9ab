"""Training recipes of an eps objective: loss weighting per noise level and the network's parameterization.

Every recipe is written on the discrete VP chain of the config (Ho et al. eq. 4), x_t = sqrt(abar_t) x_0
+ sqrt(1 - abar_t) eps, through its noise level in EDM's terms (Karras et al. 2022, "EDM"):
sigma_t = sqrt((1 - abar_t) / abar_t), so x_t / sqrt(abar_t) = x_0 + sigma_t eps and SNR_t = 1 / sigma_t^2.

Weighting (train.objective.weighting): the factor w(sigma) of the per-example eps-MSE
||eps_hat - eps||^2. Every loss on another target is one of these: ||x0_hat - x0||^2 =
sigma^2 ||eps_hat - eps||^2 and ||v_hat - v||^2 = (1 + sigma^2) ||eps_hat - eps||^2, so one weight
table serves every prediction target (Kingma & Gao 2023 write every objective this way).

  uniform  w = 1                           the paper's L_simple (Ho et al. eq. 14)
  min_snr  w = min(SNR, gamma) / SNR       min-SNR-gamma (Hang et al. 2023), = min(1, gamma sigma^2);
                                           the same weight as their x0 form min(SNR, gamma) and their
                                           v form min(SNR, gamma) / (SNR + 1)
  edm      w = lambda(sigma) sigma^2       EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
             = 1 + sigma^2 / sigma_data^2  (Table 1; eq. 2 is the loss on D = x0_hat)

Prediction (train.objective.prediction): what the U-Net's own output F means, by EDM's preconditioning
(eq. 7) D(x; sigma) = c_skip x + c_out F(c_in x; t), x = x_t / sqrt(abar_t). The network seen by every
trainer, loader and sampler (guided.networks.preconditioned.PreconditionedUNet) always returns eps = (x - D) / sigma, so a model of any
recipe is an eps model on its chain and every sampler serves it.

  eps  c_skip = 1,                 c_out = -sigma,                        c_in = 1 / sqrt(1 + sigma^2)
  x0   c_skip = 0,                 c_out = 1,                             c_in = 1 / sqrt(1 + sigma^2)
  v    c_skip = 1 / (1 + sigma^2), c_out = -sigma / sqrt(1 + sigma^2),    c_in = 1 / sqrt(1 + sigma^2)
       (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022)
  edm  c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
       c_in = 1 / sqrt(sigma^2 + s_d^2)    (Table 1, s_d = sigma_data)

c_in = 1 / sqrt(1 + sigma^2) gives the network x_t itself, as the paper's models see it. With
weighting=edm and prediction=edm the loss is exactly EDM's eq. 8: ||F - F_target||^2 with unit weight.
"""
from __future__ import annotations

import torch

from guided.errors import GuidedError


def chain_sigmas(alphas_cumprod) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) per timestep, float64."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def uniform_weight(sigma, cfg):
    return torch.ones_like(sigma)


def min_snr_weight(sigma, cfg):
    return (cfg.min_snr_gamma * sigma**2).clamp(max=1.0)  # min(SNR, gamma) / SNR with SNR = 1 / sigma^2


def edm_weight(sigma, cfg):
    return 1 + sigma**2 / cfg.sigma_data**2  # lambda(sigma) sigma^2


WEIGHTINGS = {"uniform": uniform_weight, "min_snr": min_snr_weight, "edm": edm_weight}


def _unit_input(sigma, sd):
    return 1 / (1 + sigma**2).sqrt()


def eps_coefficients(sigma, sd):
    return torch.ones_like(sigma), -sigma, _unit_input(sigma, sd)


def x0_coefficients(sigma, sd):
    return torch.zeros_like(sigma), torch.ones_like(sigma), _unit_input(sigma, sd)


def v_coefficients(sigma, sd):
    return 1 / (1 + sigma**2), -sigma / (1 + sigma**2).sqrt(), _unit_input(sigma, sd)


def edm_coefficients(sigma, sd):
    root = (sigma**2 + sd**2).sqrt()
    return sd**2 / root**2, sigma * sd / root, 1 / root


PREDICTIONS = {"eps": eps_coefficients, "x0": x0_coefficients, "v": v_coefficients, "edm": edm_coefficients}


def check_recipe(cfg) -> None:
    """Refuse an unknown or out-of-range recipe setting (train.objective.*) in one line."""
    for key, table in (("weighting", WEIGHTINGS), ("prediction", PREDICTIONS)):
        if cfg[key] not in table:
            raise GuidedError(f"train.objective.{key} must be one of {', '.join(table)}, not {cfg[key]!r}")
    if not cfg.min_snr_gamma > 0:
        raise GuidedError(f"train.objective.min_snr_gamma must be > 0, not {cfg.min_snr_gamma}")
    if not cfg.sigma_data > 0:
        raise GuidedError(f"train.objective.sigma_data must be > 0, not {cfg.sigma_data}")


def is_default(cfg) -> bool:
    """Whether train.objective holds the paper's recipe (what every objective other than eps trains)."""
    return cfg.weighting == "uniform" and cfg.prediction == "eps" and cfg.schedule_sampler != "lognormal"


def loss_weights(cfg, alphas_cumprod) -> torch.Tensor | None:
    """w(sigma_t) per timestep (float32), None for the paper's uniform weight."""
    check_recipe(cfg)
    if cfg.weighting == "uniform":
        return None
    return WEIGHTINGS[cfg.weighting](chain_sigmas(alphas_cumprod), cfg).float()
