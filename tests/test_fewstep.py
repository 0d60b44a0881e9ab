"""The few-step samplers (guided/samplers/fewstep.py) against exact oracles.

Order: on the levels of a Karras schedule, the classifier-guided (scale 1) denoiser of the exact
Gaussian mixture of tests/mixture_nets.py is exactly the denoiser of component k, which is linear:
D(x; s) = m + S / (S + s^2) (x - m). Its probability flow is solved in closed form,
x(0) = m + (x_T - m) sqrt(S / (S + s_T^2)), so the global error of each deterministic solver is exact
(no sampling noise); for the stochastic ones the output is a linear function of x_T and of each
injected noise, so its exact mean and variance come from one batch of basis inputs. The error
is measured at N and 2N levels and the ratio checked against the order of each paper.
Through the application's path (generate.sample_batch on the mixture pipeline of
tests/test_guidance_layer.py): the exact guided law, every guidance term and interval, and the
same images at any batch size.
"""
import math

import pytest
import torch

from guided.config import DiffusionConfig, node
from guided.diffusion.gaussian import create_diffusion, sigma_steps, space_timesteps
from guided.errors import GuidedError
from guided.generation import SampleOptions, sample_batch
from guided.diffusion.space import threshold
from guided.samplers import fewstep
from mixture_nets import MEANS, VARS, WEIGHTS
from test_guidance_layer import EMPTY, TERMS, draw, pipeline

NEW = ("dpm++2m-sde", "dpm++3m", "edm")
K = 1  # the class guided to
SMAX, SMIN = 80.0, 1e-4


def karras(n, smax=SMAX, smin=SMIN, rho=7.0):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)] + [0.0]


def guided_denoiser(x, sigma):
    """D(x; s) of the mixture plus s^2 grad log p_s(k | x) (classifier guidance, scale 1), in float64."""
    x = x.detach().double().requires_grad_(True)
    var = VARS.double() + sigma**2  # [K]
    logn = -0.5 * ((x[:, None, :] - MEANS.double()[None]) ** 2).sum(-1) / var - torch.log(2 * math.pi * var)
    joint = WEIGHTS.double().log() + logn
    log_mix = torch.logsumexp(joint, 1)
    g_mix, = torch.autograd.grad(log_mix.sum(), x, retain_graph=True)
    g_cls, = torch.autograd.grad((joint[:, K] - log_mix).sum(), x)
    return (x + sigma**2 * g_mix + sigma**2 * g_cls).detach()


class BasisNoise:
    """Row 2 + j gets a unit noise at the j-th draw, every other row none."""

    def __init__(self):
        self.draws = 0

    def randn_like(self, x):
        z = torch.zeros_like(x)
        if 2 + self.draws < len(x):
            z[2 + self.draws] = 1
        self.draws += 1
        return z


def exact_moments(name, n, **kw):
    """(mean, variance) of the sampled law with x_T ~ N(m_k, S_k + s_T^2) exactly, per coordinate."""
    sig = karras(n)
    x = torch.zeros(2 + 2 * n, 2, dtype=torch.float64)
    x[1] = 1.0
    noise = BasisNoise()
    out = fewstep.FUNCTIONS[name](guided_denoiser, sig, x, noise=noise, **kw)
    assert noise.draws <= len(x) - 2
    b, a, c = out[0], out[1] - out[0], out[2:] - out[0]
    return b + a * MEANS[K].double(), a**2 * (VARS[K] + sig[0] ** 2) + (c**2).sum(0)


def weak_error(name, n, **kw):
    mean, var = exact_moments(name, n, **kw)
    return ((mean - MEANS[K]).abs() + (var - VARS[K]).abs()).sum().item()


def path_error(name, n, **kw):
    x_T = torch.tensor([[3.0, -5.0], [-20.0, 40.0], [100.0, 0.0]], dtype=torch.float64)
    out = fewstep.FUNCTIONS[name](guided_denoiser, karras(n), x_T, noise=None, **kw)
    m, s = MEANS[K].double(), VARS[K].double()
    exact = m + (x_T - m) * torch.sqrt(s / (s + SMAX**2))
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("name, kw, order", [
    ("dpm++3m", {}, 3),  # Lu et al. 2022: third-order multistep
    ("dpm++2m-sde", {"eta": 0.0}, 2),  # eta = 0: DPM-Solver++(2M), second order
    ("edm", {"churn": 0.0}, 2),  # no churn: Heun's method, second order (Karras et al. 2022 sec. 3)
])
def test_deterministic_solvers_converge_to_the_exact_flow_at_their_order(name, kw, order):
    e1, e2 = path_error(name, 24, **kw), path_error(name, 48, **kw)
    assert e2 < 0.02 * math.sqrt(VARS[K]), (e1, e2)
    assert e1 / e2 > 2 ** order * 0.7, (name, e1, e2, e1 / e2)


@pytest.mark.parametrize("name, kw, order", [
    ("dpm++2m-sde", {"eta": 1.0}, 2),  # measured 20 -> 40 -> 80 levels: ratios 3.8, 4.4
    ("edm", {"churn": 5.0, "s_noise": 1.0, "s_tmin": 0.0, "s_tmax": math.inf}, 2),  # ratios 4.8, 4.3
])
def test_stochastic_samplers_converge_to_the_exact_guided_law(name, kw, order):
    """The exact mean and variance of the sampled law tend to those of component k, the weak error
    falling as N^-2 on this oracle (neither paper states a weak order; this is what they reach)."""
    e1, e2, e3 = (weak_error(name, n, **kw) for n in (20, 40, 80))
    assert e3 < e2 < e1, (e1, e2, e3)
    assert e2 / e3 > 2 ** order * 0.8, (name, e1, e2, e3)
    assert e3 < 0.1 * VARS[K].item()


def test_exact_moments_of_the_oracle():
    """The basis trick on the exact flow: with no noise the variance is the analytic a^2 (S + s_T^2) -> S."""
    mean, var = exact_moments("dpm++3m", 200)
    assert torch.allclose(mean, MEANS[K].double(), atol=1e-6) and torch.allclose(var, VARS[K].double(), rtol=1e-3)


# -- the noise-level schedules -----------------------------------------------------------------------
def test_karras_and_logsnr_respacings():
    cfg = node(DiffusionConfig, dict(noise_schedule="cosine"))
    abar = create_diffusion(cfg, "").alphas_cumprod.numpy()
    log_sig = 0.5 * torch.log(torch.tensor((1 - abar) / abar))
    for name in ("karras", "logsnr"):
        for n in (8, 20, 50):
            steps = create_diffusion(cfg, f"{name}{n}").timestep_map.tolist()
            assert steps == sigma_steps(abar, f"{name}{n}") and len(steps) == n and steps == sorted(set(steps))
            assert steps[0] == 0 and abs(math.exp(log_sig[steps[-1]]) - 80) < 5  # from sigma_min to EDM's 80
    lam = -log_sig[create_diffusion(cfg, "logsnr20").timestep_map]  # uniform in log-SNR, up to rounding
    gaps = (lam[:-1] - lam[1:])[2:]  # the two cleanest levels round to the coarse first timesteps
    assert gaps.std() < 0.1 * gaps.mean(), gaps
    assert space_timesteps(1000, "quad10")[:3] == [0, 12, 49]  # the existing respacings unchanged
    for bad in ("karras1", "karrasx", "logsnr2000"):
        with pytest.raises(GuidedError, match="respacing"):
            create_diffusion(cfg, bad)


def test_dynamic_thresholding():
    x0 = torch.tensor([[0.5, -0.2, 0.9, 0.1], [3.0, -4.0, 0.5, 1.0]]).view(2, 1, 2, 2)
    out = threshold(x0, "dynamic", percentile=0.5)
    assert torch.equal(out[0], x0[0].clamp(-1, 1))  # quantile under 1: a plain clip
    s = torch.quantile(x0[1].abs().flatten(), 0.5)
    assert torch.allclose(out[1], x0[1].clamp(-s, s) / s) and out.abs().max() <= 1
    assert torch.equal(threshold(x0, "none"), x0)


# -- through the application's path ------------------------------------------------------------------
@pytest.mark.parametrize("sampler", NEW)
def test_the_registry_samples_the_exact_guided_law(sampler):
    """Classifier guidance at scale 1 on the unconditional mixture samples component k exactly
    (at 50 levels the solvers' own variance error is under 4%: the oracle above)."""
    p = pipeline(unconditional=True)
    o = SampleOptions(sampler=sampler, steps="karras50", scale=1.0, clip="none", calibration=False,
                      settings={"churn": 5.0, "s_tmin": 0.0, "s_tmax": 1e9} if sampler == "edm" else {})
    x = sample_batch(p, [K] * 3000, range(3000), o).flatten(1)
    assert torch.allclose(x.mean(0), MEANS[K], atol=0.012), x.mean(0)
    assert torch.allclose(x.var(0), VARS[K].expand(2), rtol=0.1), x.var(0)


@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("sampler", NEW)
def test_every_term_and_interval(sampler, term):
    on, off, field = TERMS[term]
    p = pipeline(unconditional=term != "cfg")
    full, none = draw(p, sampler, **on), draw(p, sampler, **off)
    assert not torch.allclose(full, none, atol=1e-3)
    assert torch.allclose(draw(p, sampler, **on, **{field: (0.0, math.inf)}), full, atol=1e-5)
    assert torch.allclose(draw(p, sampler, **on, **{field: EMPTY}), none, atol=1e-6)


@pytest.mark.parametrize("sampler", NEW)
def test_same_images_at_any_batch_size(sampler):
    p = pipeline(unconditional=True)
    o = SampleOptions(sampler=sampler, steps="logsnr8", scale=2.0)
    labels, seeds = [0, 1, 1, 0, 1, 0], list(range(40, 46))
    whole = sample_batch(p, labels, seeds, o)
    parts = torch.cat([sample_batch(p, labels[:2], seeds[:2], o), sample_batch(p, labels[2:], seeds[2:], o)])
    assert torch.equal(whole, parts)


def test_network_evaluations_and_bad_settings():
    p = pipeline(unconditional=True)
    counts = {}
    for sampler in NEW:
        calls = []
        p.model.register_forward_hook(lambda m, i, o: calls.append(1))
        sample_batch(p, [0], [0], SampleOptions(sampler=sampler, steps="karras10"))
        counts[sampler] = len(calls)
        p.model._forward_hooks.clear()
    assert counts == {"dpm++2m-sde": 10, "dpm++3m": 10, "edm": 19}
    for extra, match in (({"churn": "lots"}, "takes a float"), ({"churn": -5}, r"must lie in \[0, inf\]"),
                         ({"rtol": 1.0}, "has no setting 'rtol'"), ({"eta": 0.5}, "has no setting 'eta'")):
        with pytest.raises(GuidedError, match=match):
            sample_batch(p, [0], [0], SampleOptions(sampler="edm", steps="karras10", settings=extra))


def test_edm_steps_down_from_pure_noise_without_blowing_up():
    """A chain whose first level is far above the rest (quad10 on a cosine chain: sigma 20291 -> 2.9): Heun's
    correction on that step would multiply the denoiser's error by thousands, so edm takes Euler's step
    there, exact from pure noise; the flow is still reached at second order."""
    x_T = torch.tensor([[3.0, -5.0], [-1.0, 2.0], [0.5, 0.0]], dtype=torch.float64) * 20000.0
    m, s = MEANS[K].double(), VARS[K].double()
    exact = m + (x_T - m) * torch.sqrt(s / (s + 20000.0**2))
    errors = []
    for n in (24, 48):
        sig = [20000.0] + karras(n, smax=3.0)
        out = fewstep.edm(guided_denoiser, sig, x_T, noise=None, churn=0.0)
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.02 * math.sqrt(VARS[K]), errors
    assert errors[0] / errors[1] > 4 * 0.7, errors
