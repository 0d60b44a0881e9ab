"""Guidance: wrappers around a score model's output, never built into a network.

Classifier guidance (Dhariwal & Nichol 2021) uses the gradient of the noise-
aware classifier's log-probability, grad_x log p_phi(y | x_t, t), taken at x_t
with the ORIGINAL timestep t (never a respaced index):
- Algorithm 1 (DDPM): shift the mean, mu + s * Sigma * grad;
- Algorithm 2 (DDIM): correct eps, eps - sqrt(1 - abar_t) * s * grad.
Classifier-free guidance (Ho & Salimans 2022) mixes conditional and
unconditional predictions of one network trained with label dropout.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion

CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_grad(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """grad_x sum_i log softmax(classifier(x, t))_i[y_i], in the dtype of x."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        selected = log_probs[torch.arange(len(y), device=y.device), y]
        return torch.autograd.grad(selected.sum(), x_in)[0]


def classifier_cond_fn(classifier, y: torch.Tensor, scale: float) -> CondFn:
    """cond_fn(x, t) = scale * grad_x log p(y | x, t); t is the original timestep."""
    def cond_fn(x, t):
        return scale * classifier_grad(classifier, x, t, y)
    return cond_fn


def condition_mean(out: dict, grad: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: mu + Sigma * s grad log p(y | x_t)."""
    return out["mean"].float() + out["variance"] * grad.float()


def condition_score(diffusion: GaussianDiffusion, out: dict, x: torch.Tensor, t: torch.Tensor,
                    grad: torch.Tensor) -> dict:
    """Algorithm 2: eps_hat = eps - sqrt(1 - abar_t) * s grad, then x0 and the mean anew.
    eps is recomputed from the (possibly clipped) x0 prediction, as the reference does."""
    abar = diffusion.extract(diffusion.alphas_cumprod, t, x)
    eps = diffusion.eps_from_xstart(x, t, out["pred_xstart"]) - (1 - abar).sqrt() * grad
    pred_xstart = diffusion.xstart_from_eps(x, t, eps)
    mean, _, _ = diffusion.q_posterior(pred_xstart, x, t)
    return {**out, "pred_xstart": pred_xstart, "mean": mean}


def cfg_model_fn(model, y: torch.Tensor, null_label: int, scale: float):
    """Classifier-free guidance as a model function: eps_u + scale * (eps_c - eps_u)
    on the eps channels (scale 1 = the conditional model, 0 = unconditional; the
    paper's w is scale - 1). Learned-variance channels come from the conditional pass."""
    def model_fn(x, t):
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_label)]))
        cond, uncond = both.chunk(2)
        c = x.shape[1]
        eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)
    return model_fn
