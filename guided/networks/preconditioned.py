"""The ADM U-Net of a training recipe whose own output is another target than eps (x0, v, EDM's F), wrapped
so that it still returns eps: every trainer, loader and sampler serves it as an eps model on its chain.
The recipes' arithmetic (loss weights, the preconditioning coefficients of EDM eq. 7) is in
guided/diffusion/recipes.py.
"""
from __future__ import annotations

import torch

from guided.diffusion.gaussian import create_diffusion
from guided.diffusion.recipes import PREDICTIONS, check_recipe
from guided.diffusion.sde import lerp_table
from guided.errors import GuidedError
from guided.networks.dit import DiT
from guided.networks.unet import UNetModel

SCORE_NETWORKS = (UNetModel, DiT)  # what a score model's weights build: model.arch adm | dit


class PreconditionedUNet(UNetModel):
    """The ADM U-Net whose own output F is `prediction`'s, returning eps: eps = (x - D) / sigma with
    D = c_skip x + c_out F(c_in x; t) (EDM eq. 7), x = x_t / sqrt(abar_t). The parameters (and so the
    state dict) are the U-Net's; a learned variance's channels pass through unchanged. Network time is
    the chain's original timestep (rescaled to 0..1000 with diffusion.rescale_timesteps)."""

    def __init__(self, cfg, diffusion_cfg, objective_cfg):
        super().__init__(cfg)
        check_recipe(objective_cfg)
        self.coefficients = PREDICTIONS[objective_cfg.prediction]
        self.sigma_data = float(objective_cfg.sigma_data)
        base = create_diffusion(diffusion_cfg, "")
        self.time_scale = base.num_timesteps / 1000.0 if base.rescale_timesteps else 1.0
        log_abar = base.alphas_cumprod.log().float()
        self.register_buffer("log_abar", log_abar, persistent=False)  # not in the state dict

    def sigma_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma at (possibly fractional) network time, log abar interpolated between steps."""
        log_abar = lerp_table(self.log_abar, timesteps.float() * self.time_scale)  # the one interpolation
        return torch.expm1(-log_abar).clamp(min=1e-20).sqrt()

    def forward(self, x_t, timesteps, y=None):
        sigma = self.sigma_of(timesteps).view(-1, *[1] * (x_t.dim() - 1))
        c_skip, c_out, c_in = self.coefficients(sigma, self.sigma_data)
        x = x_t * (1 + sigma**2).sqrt()  # x_t / sqrt(abar_t): the data plus sigma-scaled noise
        out = super().forward((c_in * x).to(x_t.dtype), timesteps, y)
        c = x_t.shape[1]
        F = out[:, :c].float()
        eps = ((1 - c_skip) * x - c_out * F) / sigma
        return torch.cat([eps.to(out.dtype), out[:, c:]], dim=1)


def build_unet(cfg) -> UNetModel | DiT:
    """The score network of a RunConfig: a DiT (model.arch: dit), the plain ADM U-Net for the paper's eps
    prediction (unchanged arithmetic), else a PreconditionedUNet that still returns eps."""
    objective = cfg.train.objective if "train" in cfg else None
    arch = cfg.model.get("arch", "adm")
    if arch not in ("adm", "dit"):
        raise GuidedError(f"model.arch={arch}: choose adm (the ADM U-Net) or dit (a DiT)")
    try:
        if arch == "dit":
            if objective is not None and objective.get("prediction", "eps") != "eps":
                raise GuidedError(f"train.objective.prediction={objective.prediction} preconditions the ADM U-Net; "
                                  "a DiT trains as its paper does, on eps (prediction: eps)")
            return DiT(cfg.model)
        if objective is None or objective.get("prediction", "eps") == "eps" or objective.name != "eps":
            return UNetModel(cfg.model)
        return PreconditionedUNet(cfg.model, cfg.diffusion, objective)
    except ValueError as e:
        raise GuidedError(f"cannot build the U-Net of this config: {e}") from None
