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
from guided.diffusion.gaussian import create_diffusion
from guided.samplers.discrete import SampleNoise, ddim, ddpm, dpmpp_2m

SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpm++": dpmpp_2m}  # the discrete sampler functions

MU, S = torch.tensor([0.3, -0.2, 0.0, 0.5]), 0.2


def gaussian_eps_model(diffusion_full):
    abar_all = diffusion_full.alphas_cumprod

    def model_fn(x, t):  # t: original timesteps
        abar = abar_all[t].to(x.dtype).view(-1, 1)
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


def gaussian_x0(x, a, sigma2):
    """E[x0 | x_t] for x0 ~ N(MU, S^2 I), x_t = a x0 + sigma z: (a S^2 x_t + sigma^2 MU) / (a^2 S^2 + sigma^2)."""
    return (a * S**2 * x + sigma2 * MU) / (a**2 * S**2 + sigma2)


@pytest.mark.parametrize("sampler, steps", [("ddpm", "20"), ("ddim", "20"), ("dpm++", "quad20")])
def test_step_callback_sees_each_x0_prediction_and_changes_nothing(sampler, steps):
    """callback(i, x, pred_xstart) gets every step once, from the last index to 0, with the ideal
    denoiser's E[x0 | x_t] at the x the step started from; the samples stay bit-identical."""
    cfg = node(DiffusionConfig, dict(noise_schedule="cosine", variance="fixed_small"))
    full, spaced = create_diffusion(cfg, ""), create_diffusion(cfg, steps)
    x_T = SampleNoise(range(50)).randn((4,)).double()  # float64: x0 = (x - sigma eps) / a at a ~ 1e-4
    seen = []
    run = lambda **kw: SAMPLERS[sampler](spaced, gaussian_eps_model(full), x_T, clip_denoised=False,  # noqa: E731
                                         noise=SampleNoise(range(50, 100)), **kw)
    plain = run()
    hooked = run(callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())))
    assert torch.equal(plain, hooked)
    assert [i for i, _, _ in seen] == list(range(spaced.num_timesteps - 1, -1, -1))
    assert torch.equal(seen[-1][1], hooked)
    for (i, _, x0), x_t in zip(seen, [x_T] + [x for _, x, _ in seen[:-1]]):
        abar = spaced.alphas_cumprod[i]
        assert torch.allclose(x0, gaussian_x0(x_t, abar**0.5, 1 - abar), atol=1e-9), i


def test_preview_reports_tweedies_x0_along_a_score_sampler():
    """generate.previewing: at each score evaluation of the pc sampler, the share of [T, eps] done
    and (x + sigma^2 s) / alpha, which for Gaussian data is exactly E[x0 | x_t]; pc's output unchanged."""
    from guided.guidance.denoiser import reporting as previewing
    from guided.samplers.continuous import pc_sampler
    from guided.diffusion.sde import VPSDE

    sde = VPSDE()

    def score(x, t):  # grad log N(x; a MU, (a^2 S^2 + sigma^2) I)
        a, sigma = (v.view(-1, 1) for v in sde.marginal(t))
        calls.append((x.clone(), a, sigma))
        return -(x - a * MU) / (a**2 * S**2 + sigma**2)

    x_T = torch.randn(200, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls, shown = [], []
    plain = pc_sampler(score, sde, x_T, steps=30, generator=torch.Generator().manual_seed(5))
    calls.clear()
    hooked = pc_sampler(previewing(score, sde, lambda done, x0: shown.append((done, x0))), sde, x_T, steps=30,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, hooked) and len(shown) == len(calls) == 2 * 30
    done = [d for d, _ in shown]
    assert done[0] == 0 and abs(done[-1] - 1) < 1e-6 and done == sorted(done)
    for (x, a, sigma), (_, x0) in zip(calls, shown):
        assert torch.allclose(x0, gaussian_x0(x, a, sigma**2), atol=1e-9)
