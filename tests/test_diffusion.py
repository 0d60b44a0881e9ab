"""Schedules, respacing, the posterior and the loss terms on hand-computable inputs."""
import math

import numpy as np
import pytest
import torch

from guided.config import DiffusionConfig, node
from guided.diffusion.gaussian import create_diffusion, named_beta_schedule, space_timesteps
from guided.errors import GuidedError
from guided.diffusion.losses import (LossSecondMomentResampler, UniformSampler, discretized_gaussian_log_likelihood, normal_kl,
                           training_losses)


def diff(**kw):
    return create_diffusion(node(DiffusionConfig, kw))


@pytest.mark.parametrize("spec, expected", [
    ("ddim25", list(range(0, 1000, 40))),
    ("ddim1000", list(range(1000))),
    ("", list(range(1000))),
    ("1000", list(range(1000))),
    ("4", [0, 333, 666, 999]),
    ("1,1", [0, 500]),
    ("quad5", [0, 62, 250, 562, 999]),
    ("quad1000", list(range(1000))),
])
def test_respacing(spec, expected):
    assert space_timesteps(1000, spec) == expected


def test_section_counts():
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45
    assert steps[0] == 0 and steps[9] == 99 and steps[10] == 100 and steps[24] == 199 and steps[-1] == 299


@pytest.mark.parametrize("spec, message", [
    ("2000", "asks for 2000 steps from a section of only 1000"),
    ("600,600", "asks for 600 steps from a section of only 500"),
    ("ddim999", "no integer stride gives exactly 999"),
    ("ddimx", "expected ddimN"),
    ("ten", "expected a step count"),
    ("0", "at least one step"),
])
def test_bad_respacing(spec, message):
    with pytest.raises(GuidedError, match=message):
        space_timesteps(1000, spec)


def test_respaced_process_keeps_alpha_bars():
    full, spaced = diff(noise_schedule="cosine"), diff(noise_schedule="cosine", timestep_respacing="50")
    kept = spaced.timestep_map
    assert torch.allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12)
    t = torch.tensor([0, 10, 49])
    assert torch.equal(spaced.model_t(t), kept[t])


def test_schedules():
    lin = named_beta_schedule("linear", 1000)
    assert lin[0] == pytest.approx(1e-4) and lin[-1] == pytest.approx(0.02)
    assert named_beta_schedule("linear", 100)[-1] == pytest.approx(0.2)  # rescaled to the same range
    cos = named_beta_schedule("cosine", 1000)
    abar = np.cumprod(1 - cos)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[499] == pytest.approx(f(0.5) / f(0), rel=1e-9)
    assert cos.max() == pytest.approx(0.999)
    with pytest.raises(GuidedError, match="unknown noise schedule"):
        named_beta_schedule("sigmoid", 10)


def test_q_sample_moments():
    d = diff()
    t = torch.full((20000,), 300)
    x0 = torch.full((20000, 1), 0.5)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    abar = d.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_posterior_is_the_gaussian_product():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): check mean and variance by completing the square."""
    d = diff(noise_schedule="cosine")
    t, x0, xt = 500, torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.7]], dtype=torch.float64)
    b, a_prev = d.betas[t].item(), d.alphas_cumprod_prev[t].item()
    prec = (1 - b) / b + 1 / (1 - a_prev)
    mean = ((math.sqrt(1 - b) / b) * xt + (math.sqrt(a_prev) / (1 - a_prev)) * x0) / prec
    m, v, _ = d.q_posterior(x0, xt, torch.tensor([t]))
    assert m.item() == pytest.approx(mean.item(), rel=1e-9) and v.item() == pytest.approx(1 / prec, rel=1e-9)


def test_variances():
    t = torch.tensor([0, 5, 999])
    x = torch.zeros(3, 1)
    small, large = diff(variance="fixed_small"), diff(variance="fixed_large")
    v, lv = small.p_variance(None, x, t)
    assert torch.allclose(v, small.posterior_variance[t].float().view(-1, 1))
    v, lv = large.p_variance(None, x, t)
    assert v[2].item() == pytest.approx(large.betas[999].item()) and v[0].item() == pytest.approx(large.posterior_variance[1].item())
    learned = diff(variance="learned_range")
    v_hi, _ = learned.p_variance(torch.ones(3, 1), x, t)  # v = 1 -> beta_t
    v_lo, lv_lo = learned.p_variance(-torch.ones(3, 1), x, t)  # v = -1 -> clipped posterior variance
    assert v_hi[2].item() == pytest.approx(learned.betas[999].item(), rel=1e-5)
    assert lv_lo[1].item() == pytest.approx(learned.posterior_log_variance_clipped[5].item(), rel=1e-6)


def test_normal_kl_hand_values():
    z = torch.zeros(1)
    assert normal_kl(z, z, z, z).item() == 0
    # KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, e) || N(0, 1)) = (e - 1 - 1) / 2
    assert normal_kl(z + 1, z, z, z).item() == pytest.approx(0.5)
    assert normal_kl(z, z + 1, z, z).item() == pytest.approx((math.e - 2) / 2)


def test_discretized_likelihood_sums_to_one():
    levels = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, 0.1), torch.full_like(levels, math.log(0.3)))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=2e-3)


def oracle_model(diffusion, x0, noise, var_value):
    """A 'network' that returns the true noise and a fixed variance output."""
    def model(x_t, t):
        return torch.cat([noise, torch.full_like(noise, var_value)], dim=1)
    return model


def test_mse_of_the_true_noise_is_zero_and_vb_of_the_true_posterior_is_zero():
    d = diff(variance="learned_range", noise_schedule="cosine")
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 100, 500, 999])
    # v = -1 gives exactly the clipped posterior log-variance, so KL(q || p) = 0 for t > 0
    terms = training_losses(d, oracle_model(d, x0, noise, -1.0), x0, t, noise)
    assert torch.allclose(terms["mse"], torch.zeros(4), atol=1e-10)
    assert torch.allclose(terms["vb"], torch.zeros(4), atol=1e-5)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_at_t0_is_the_decoder_nll_and_mse_is_hand_computable():
    d = diff(variance="learned_range")
    x0 = torch.zeros(1, 3, 2, 2)
    noise = torch.ones_like(x0)
    terms = training_losses(d, lambda x, t: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1), x0,
                            torch.tensor([0]), noise)
    assert terms["mse"].item() == pytest.approx(1.0)  # mean((1 - 0)^2)
    assert terms["vb"].item() > 0  # decoder NLL in bits of a bin of width 2/255


def test_hybrid_vb_does_not_train_the_mean():
    d = diff(variance="learned_range")
    x0, noise = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    terms = training_losses(d, lambda x, t: out, x0, torch.tensor([10, 700]), noise)
    grad_vb = torch.autograd.grad(terms["vb"].sum(), out)[0]
    assert grad_vb[:, :3].abs().max() == 0 and grad_vb[:, 3:].abs().max() > 0


def test_timestep_samplers():
    u = UniformSampler(10)
    t, w = u.sample(1000, "cpu", torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 9 and torch.all(w == 1)
    s = LossSecondMomentResampler(4, history=2)
    assert np.allclose(s.weights(), 1)
    s.update_with_all_losses([0, 0, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 1, 10, 10])
    w = s.weights()
    assert s.warmed_up() and w[3] > 9 * w[0]
    t, iw = s.sample(4000, "cpu", torch.Generator().manual_seed(0))
    # importance weights undo the non-uniform sampling: E[w] = 1
    assert iw.mean().item() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("steps, respacing, message", [
    (1, "", "diffusion.steps must be at least 2, got 1"),
    (1000, "1", r"respacing '1' keeps a single step \(timestep 0\)"),
])
def test_a_single_step_is_refused(steps, respacing, message):
    """One step would keep t = 0 only (and the reference's variance clipping reads index 1)."""
    with pytest.raises(GuidedError, match=message):
        create_diffusion(node(DiffusionConfig, {"steps": steps}), respacing)
    assert create_diffusion(node(DiffusionConfig, {"steps": 2, "noise_schedule": "cosine"}), "2").num_timesteps == 2
    with pytest.raises(GuidedError, match="the linear noise schedule needs more than 20 diffusion steps"):
        create_diffusion(node(DiffusionConfig, {"steps": 20}))  # beta_T = 1: NaN everywhere after it
