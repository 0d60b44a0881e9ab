"""DDPM, DDIM and DPM-Solver++ on Gaussian data, whose eps-prediction is known in closed form.

x_0 ~ N(mu, s^2 I) gives x_t ~ N(a mu, (a^2 s^2 + sigma^2) I) with a = sqrt(abar_t),
sigma = sqrt(1 - abar_t), and the ideal denoiser E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2).
With 4000 samples in 4 dimensions the sample mean has a standard error of s / sqrt(4000) = 0.003
per coordinate and the sample std about s / sqrt(2 * 4000) = 0.002: tolerances of 0.02 (mean)
and 0.02 (std) are about 6 standard errors plus the solvers' discretisation error.
"""
import pytest
import torch

from guided.config import DiffusionConfig, node
from guided.diffusion import create_diffusion
from guided.sampling import SAMPLERS, SampleNoise

MU, S = torch.tensor([0.3, -0.2, 0.0, 0.5]), 0.2


def gaussian_eps_model(diffusion_full):
    abar_all = diffusion_full.alphas_cumprod

    def model_fn(x, t):  # t: original timesteps
        abar = abar_all[t].float().view(-1, 1)
        a, sigma2 = abar.sqrt(), 1 - abar
        return sigma2.sqrt() * (x - a * MU) / (abar * S**2 + sigma2)
    return model_fn


@pytest.mark.parametrize("sampler, steps", [("ddpm", "250"), ("ddim", "quad50"), ("dpm++", "quad25"),
                                            ("dpm++", "quad10")])
def test_samplers_reproduce_a_gaussian(sampler, steps):
    cfg = node(DiffusionConfig, dict(noise_schedule="cosine", variance="fixed_small"))
    full, spaced = create_diffusion(cfg, ""), create_diffusion(cfg, steps)
    n = 4000
    x_T = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    kw = {"noise": None} if sampler != "ddpm" else {}
    torch.manual_seed(2)
    x0 = SAMPLERS[sampler](spaced, gaussian_eps_model(full), x_T, clip_denoised=False, **kw)
    assert torch.allclose(x0.mean(0), MU, atol=0.02), x0.mean(0)
    assert torch.allclose(x0.std(0), torch.full((4,), S), atol=0.02), x0.std(0)


def test_dpm_solver_is_more_accurate_than_ddim_at_few_steps():
    """Second order: at 10 and 25 steps its deterministic map is closer to the exact flow than DDIM's."""
    cfg = node(DiffusionConfig, dict(noise_schedule="cosine", variance="fixed_small"))
    full = create_diffusion(cfg, "")
    model = gaussian_eps_model(full)
    x_T = torch.randn(2000, 4, generator=torch.Generator().manual_seed(3))
    exact = SAMPLERS["ddim"](create_diffusion(cfg, "1000"), model, x_T, clip_denoised=False)
    for steps in ("quad10", "quad25"):
        err = {name: (SAMPLERS[name](create_diffusion(cfg, steps), model, x_T, clip_denoised=False, noise=None)
                      - exact).norm().item() / exact.norm().item() for name in ("ddim", "dpm++")}
        assert err["dpm++"] < 0.4 * err["ddim"], (steps, err)
    assert err["dpm++"] < 0.02


def test_per_sample_noise_gives_batch_independent_ddpm():
    cfg = node(DiffusionConfig, dict(noise_schedule="linear", variance="fixed_large", timestep_respacing="20"))
    d, full = create_diffusion(cfg), create_diffusion(cfg, "")
    model = gaussian_eps_model(full)
    seeds = list(range(6))
    whole = SAMPLERS["ddpm"](d, model, SampleNoise(seeds).randn((4,)), noise=SampleNoise(seeds), clip_denoised=False)
    half = torch.cat([SAMPLERS["ddpm"](d, model, SampleNoise(s).randn((4,)), noise=SampleNoise(s), clip_denoised=False)
                      for s in (seeds[:2], seeds[2:])])
    assert torch.allclose(whole, half, atol=1e-6)
