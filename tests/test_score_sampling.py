"""Score-based samplers on distributions whose perturbed scores are known exactly.

For Gaussian-mixture data p_0 = sum_k w_k N(m_k, S_k) every SDE here gives
p_t = sum_k w_k N(alpha_t m_k, alpha_t^2 S_k + sigma_t^2 I), so the true score,
density and noise-aware classifier p(k | x_t) are available in closed form.

Tolerance (TOL = 0.1, absolute, on each entry of the sample mean and covariance):
with N = 4000 samples of a target whose variances are <= 1, the Monte-Carlo
standard error is sqrt(S_ii / N) <= 0.016 for a mean entry and
sqrt((S_ii S_jj + S_ij^2) / N) <= 0.022 for a covariance entry, so TOL is about
4.5 standard errors (a false failure has probability < 1e-5 per entry even
before seeding), leaving a few percent of room for the discretization bias of
the samplers. Seeds are fixed, so the tests are deterministic.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from guided.errors import GuidedError
from guided.diffusion.ladder import Ladder, geometric_sigmas
from guided.diffusion.losses import dsm_loss, ncsn_loss
from guided.diffusion.models import LadderModel, eps_model_score, score_from_eps
from guided.samplers.continuous import (annealed_langevin, ode_likelihood, ode_sampler,
                                   pc_sampler, sdedit)
from guided.diffusion.sde import DiscreteVPSDE, SubVPSDE, VESDE, VPSDE, make_sde

N, TOL = 4000, 0.1
DT = torch.float64
MU = torch.tensor([1.0, -0.5], dtype=DT)
COV = torch.tensor([[1.0, 0.5], [0.5, 0.8]], dtype=DT)
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
SCORE_SAMPLERS = {"pc": pc_sampler, "ode": ode_sampler, "langevin": annealed_langevin, "sdedit": sdedit}

def guided_score(score, grad_log_prob, scale):
    """Classifier guidance in score form (Song et al. 2021 eq. 14): s + scale * grad log p(y | x_t)."""
    return lambda x, t: score(x, t) + scale * grad_log_prob(x, t)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: intra-op threads only add barrier waits, which on a
    # busy 2-core machine slowed the samplers 20x. Restored after this module.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

def gen(seed=0):
    return torch.Generator().manual_seed(seed)

class GMM:
    """Exact perturbed densities of a Gaussian mixture under a linear SDE."""

    def __init__(self, sde, weights, means, covs):
        self.sde = sde
        self.logw = torch.as_tensor(weights, dtype=DT).log()
        self.means = torch.as_tensor(means, dtype=DT)
        self.covs = torch.stack([torch.as_tensor(c, dtype=DT) for c in covs])

    def components(self, x, t):
        """Per-component log N_k(x; alpha m_k, alpha^2 S_k + sigma^2 I) and score, [N, K]."""
        if torch.all(t == t[0]):  # samplers query one time per step: invert once
            t = t[:1]
        a, s = self.sde.marginal(t)
        eye = torch.eye(x.shape[1], dtype=DT)
        c = a[:, None, None, None] ** 2 * self.covs + s[:, None, None, None] ** 2 * eye
        c_inv, logdet = torch.linalg.inv(c), torch.linalg.slogdet(c)[1]  # [1 or N, K, ...]
        diff = x[:, None, :] - a[:, None, None] * self.means
        sol = torch.einsum("nkij,nkj->nki", c_inv.expand(x.shape[0], -1, -1, -1), diff)
        logn = -0.5 * ((diff * sol).sum(-1) + logdet + x.shape[1] * math.log(2 * math.pi))
        return logn, -sol

    def log_prob(self, x, t):
        return torch.logsumexp(self.logw + self.components(x, t)[0], dim=1)

    def posterior(self, x, t):
        return torch.softmax(self.logw + self.components(x, t)[0], dim=1)

    def score(self, x, t):
        logn, scores = self.components(x, t)
        r = torch.softmax(self.logw + logn, dim=1)
        return (r[..., None] * scores).sum(1)

    def class_score(self, y):
        return lambda x, t: self.components(x, t)[1][:, y]

    def grad_log_posterior(self, y):  # grad_x log p(y | x_t) = s_y - s
        return lambda x, t: self.class_score(y)(x, t) - self.score(x, t)

def gaussian(sde):
    return GMM(sde, [1.0], MU[None], COV[None])

def check_moments(x, mean, cov, tol=TOL):
    assert torch.isfinite(x).all()
    assert torch.allclose(x.mean(0), mean, atol=tol), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=tol), (torch.cov(x.T), cov)

def prior(sde, seed=1, n=N):
    return sde.prior_sample((n, 2), generator=gen(seed), dtype=DT)

# --- SDEs -----------------------------------------------------------------

ALL_SDES = [VPSDE(), SubVPSDE(), VESDE(), make_sde("cosine"),
            DiscreteVPSDE(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0))]

@pytest.mark.parametrize("sde", ALL_SDES, ids=["vp", "subvp", "ve", "cosine", "discrete"])
def test_marginals_solve_the_sde(sde):
    """Moment ODEs of dx = f x dt + g dw: d log alpha/dt = f, d sigma^2/dt = 2 f sigma^2 + g^2."""
    t = torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=DT) + 0.0123  # off the discrete grid
    h = 1e-6
    a, s = sde.marginal(t)
    a1, s1 = sde.marginal(t + h)
    a0, s0 = sde.marginal(t - h)
    f = sde.drift(torch.ones(4, 1, dtype=DT), t)[:, 0]
    g2 = sde.diffusion(t) ** 2
    assert torch.allclose((a1.log() - a0.log()) / (2 * h), f, rtol=1e-5, atol=1e-6)
    assert torch.allclose((s1**2 - s0**2) / (2 * h), 2 * f * s**2 + g2, rtol=1e-4)

def test_discrete_vp_matches_its_table_and_timesteps():
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)
    sde = VPSDE.from_alphas_cumprod(ac)
    i = torch.tensor([0, 1, 499, 998, 999])
    t = (i + 1).to(DT) / 1000
    a, s = sde.marginal(t)
    assert torch.allclose(a**2, ac[i], rtol=1e-10) and torch.allclose(s**2, 1 - ac[i], rtol=1e-10)
    assert torch.allclose(sde.model_time(t), i.to(DT))
    assert sde.eps == 1e-3 and sde.T == 1.0

def test_cosine_vp_matches_nichol_dhariwal():
    sde, s = make_sde("cosine"), 0.008
    t = torch.tensor([0.1, 0.5, 0.9], dtype=DT)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    assert torch.allclose(sde.marginal(t)[0] ** 2, f(t) / f(torch.zeros(1, dtype=DT)))
    a_T = sde.marginal(torch.tensor([sde.T], dtype=DT))[0]
    assert sde.T == 0.9946 and float(a_T**2) < 1e-4  # close to the N(0, I) prior

def test_ve_prior_logp():
    sde, z = VESDE(), torch.randn(5, 3, dtype=DT, generator=gen())
    ref = torch.distributions.Normal(0.0, 50.0).log_prob(z).sum(1)
    assert torch.allclose(sde.prior_logp(z), ref)

# --- samplers reproduce the target ----------------------------------------

@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_pc_sampler_gaussian(name):
    sde = SDES[name]
    x = pc_sampler(gaussian(sde).score, sde, prior(sde), steps=500, snr=0.16, generator=gen())
    check_moments(x, MU, COV)

def test_euler_maruyama_predictor_only():
    sde = VPSDE()
    x = pc_sampler(gaussian(sde).score, sde, prior(sde), steps=500, predictor="euler_maruyama",
                   corrector=None, generator=gen())
    check_moments(x, MU, COV)

@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_ode_sampler_gaussian(name):
    sde = SDES[name]
    x = ode_sampler(gaussian(sde).score, sde, prior(sde), generator=gen())
    check_moments(x, MU, COV)

MIX_W, MIX_M = [0.3, 0.7], [[-1.5, 0.0], [1.5, 1.0]]
MIX_S = [[[0.3, 0.1], [0.1, 0.3]], [[0.5, 0.0], [0.0, 0.2]]]

def mixture_moments(w, m, s):
    w, m, s = (torch.as_tensor(v, dtype=DT) for v in (w, m, s))
    mean = (w[:, None] * m).sum(0)
    d = m - mean
    return mean, (w[:, None, None] * (s + d[:, :, None] * d[:, None, :])).sum(0)

@pytest.mark.parametrize("sampler", ["pc", "ode"])
def test_mixture_of_gaussians(sampler):
    sde = VESDE()
    gmm = GMM(sde, MIX_W, MIX_M, MIX_S)
    kw = {"steps": 500} if sampler == "pc" else {}
    x = SCORE_SAMPLERS[sampler](gmm.score, sde, prior(sde), generator=gen(), **kw)
    check_moments(x, *mixture_moments(MIX_W, MIX_M, MIX_S))

def test_annealed_langevin_gaussian():
    # Its own ladder: 10 levels 5 -> 0.01; the analytic score of p * N(0, sigma^2).
    sde = VESDE(sigma_min=0.01, sigma_max=5.0)
    x0 = prior(sde)
    x = annealed_langevin(gaussian(sde).score, sde, x0, steps=10, n_steps_each=100,
                          step_lr=1e-4, generator=gen())
    check_moments(x, MU, COV)

@pytest.mark.parametrize("name", ["vp", "ve"])
def test_sdedit_t0_one_samples_the_target(name):
    sde = SDES[name]
    guide = torch.full((N, 2), 3.0, dtype=DT)  # far from the data: t0 = 1 must forget it
    x = sdedit(gaussian(sde).score, sde, guide, steps=500, t0=1.0, generator=gen())
    check_moments(x, MU, COV)

def test_sdedit_mask_keeps_unmasked_coordinates():
    sde = VPSDE()
    guide = torch.randn(N, 2, dtype=DT, generator=gen(3)) + 3
    mask = torch.tensor([1.0, 0.0], dtype=DT)  # edit coordinate 0 only
    x = sdedit(gaussian(sde).score, sde, guide, steps=200, t0=0.8, mask=mask, generator=gen())
    assert torch.equal(x[:, 1], guide[:, 1])
    assert (x[:, 0] - guide[:, 0]).abs().mean() > 0.5

def test_samplers_are_reproducible():
    sde = VPSDE()
    score = gaussian(sde).score
    for name, kw in [("pc", {"steps": 20}), ("sdedit", {"steps": 20})]:
        x_T = prior(sde, n=8)
        a = SCORE_SAMPLERS[name](score, sde, x_T, generator=gen(7), **kw)
        b = SCORE_SAMPLERS[name](score, sde, x_T, generator=gen(7), **kw)
        assert torch.equal(a, b)
    ve = VESDE(0.01, 1.0)
    a, b = (annealed_langevin(gaussian(ve).score, ve, prior(ve, n=8), steps=3, n_steps_each=2,
                              generator=gen(7)) for _ in range(2))
    assert torch.equal(a, b)

# --- likelihood -----------------------------------------------------------

@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_ode_likelihood_matches_gaussian_logpdf(name):
    # For VE the N(0, sigma_max^2) prior misses p_T = N(MU, COV + sigma_max^2 I) by
    # about MU . w / sigma_max nats per sample (w ~ N(0, I)): 0.02 at the default
    # sigma_max = 50, so the VE check uses sigma_max = 500 (score_sde advises sigma_max
    # above the data's scale; the bias is the method's, not the solver's).
    sde = VESDE(sigma_max=500.0) if name == "ve" else SDES[name]
    gmm = gaussian(sde)
    x = MU + torch.randn(6, 2, dtype=DT, generator=gen(2)) @ torch.linalg.cholesky(COV).T
    ref = -gmm.log_prob(x, torch.full((6,), 1e-5, dtype=DT))
    nll = ode_likelihood(gmm.score, sde, x, unit="nats", hutchinson="exact")
    assert torch.allclose(nll, ref, rtol=0.01), (nll, ref)

def test_ode_likelihood_of_eps_model_on_discrete_vp():
    # The ODE starts at eps = 1/N (timestep 0), where p = N(alpha MU, alpha^2 COV + sigma^2 I).
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)
    sde = VPSDE.from_alphas_cumprod(ac)
    x = MU + torch.randn(6, 2, dtype=DT, generator=gen(2)) @ torch.linalg.cholesky(COV).T
    ref = -gaussian(sde).log_prob(x, torch.full((6,), 1e-3, dtype=DT))
    nll = ode_likelihood(eps_model_score(analytic_eps_model(ac), sde), sde, x, unit="nats",
                         hutchinson="exact")
    assert torch.allclose(nll, ref, rtol=0.01), (nll, ref)

@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased(probe):
    # Per-sample Hutchinson estimates are noisy (one probe per sample, fixed along
    # the path) but unbiased: their mean over 300 samples matches the exact-trace
    # NLL within 4 standard errors of the per-sample differences, and the analytic
    # mean NLL within 1% + that margin.
    sde = VPSDE()
    gmm = gaussian(sde)
    xs = MU + torch.randn(300, 2, dtype=DT, generator=gen(4)) @ torch.linalg.cholesky(COV).T
    exact = ode_likelihood(gmm.score, sde, xs, unit="nats", hutchinson="exact")
    est = ode_likelihood(gmm.score, sde, xs, unit="nats", hutchinson=probe, generator=gen())
    diff = est - exact
    margin = 4 * float(diff.std()) / math.sqrt(len(diff))
    assert float(diff.std()) > 0 and abs(float(diff.mean())) < margin
    ref = float(-gmm.log_prob(xs, torch.full((300,), 1e-5, dtype=DT)).mean())
    assert abs(float(est.mean()) - ref) < 0.01 * abs(ref) + margin

def test_bits_per_dim_convention():
    sde, gmm = VPSDE(), gaussian(VPSDE())
    x = torch.zeros(3, 2, dtype=DT)
    nats = ode_likelihood(gmm.score, sde, x, unit="nats", hutchinson="exact")
    bpd = ode_likelihood(gmm.score, sde, x, unit="bpd", hutchinson="exact")
    assert torch.allclose(bpd, nats / (2 * math.log(2)) + 7.0)

# --- guidance -------------------------------------------------------------

def component_fraction(x, sep_axis=0):
    return float((x[:, sep_axis] < 0).to(DT).mean())  # fraction in component 0

@pytest.mark.parametrize("scale,expected", [(0.0, 0.3), (1.0, 1.0), (3.0, 1.0)])
def test_classifier_guidance_moves_component_weights(scale, expected):
    # Well separated: means -4 and +4, std 0.5; guide towards component y = 0.
    sde = VPSDE()
    gmm = GMM(sde, [0.3, 0.7], [[-4.0, 0.0], [4.0, 0.0]], [torch.eye(2) * 0.25] * 2)
    score = guided_score(gmm.score, gmm.grad_log_posterior(0), scale)
    x = pc_sampler(score, sde, prior(sde), steps=300, generator=gen())
    frac = component_fraction(x)
    # Binomial SE of the fraction at p = 0.3 is sqrt(0.21 / N) = 0.007: tolerance 0.03.
    assert abs(frac - expected) < (0.03 if expected < 1 else 0.005), frac

def test_guidance_scale_one_is_the_exact_posterior_with_overlap():
    # Overlapping components: p(x | y) = p(x) p(y | x) / p(y) is N(m_y, S_y) exactly,
    # and at scale 1 the guided score is its score at every t.
    sde = SubVPSDE()
    gmm = GMM(sde, [0.5, 0.5], [[-0.7, 0.0], [0.7, 0.3]], [COV, torch.eye(2, dtype=DT) * 0.6])
    score = guided_score(gmm.score, gmm.grad_log_posterior(1), 1.0)
    x = ode_sampler(score, sde, prior(sde), generator=gen())
    check_moments(x, gmm.means[1], gmm.covs[1])

# --- adapters -------------------------------------------------------------

def analytic_eps_model(alphas_cumprod, learned_sigma=True):
    """eps*(x, tau) of Gaussian data for an ADM-style net fed fractional timesteps tau:
    alpha-bar is interpolated in log space between table entries floor(tau), ceil(tau)."""
    log_ab = alphas_cumprod.log().numpy()
    idx = np.arange(len(log_ab))

    def model(x, timesteps, y=None):
        ab = torch.from_numpy(np.exp(np.interp(timesteps.numpy(), idx, log_ab)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        c = a[:, None, None] ** 2 * COV + s[:, None, None] ** 2 * torch.eye(2, dtype=DT)
        eps = s[:, None] * torch.linalg.solve(c, x - a[:, None] * MU)
        return torch.cat([eps, torch.full_like(eps, 7.0)], 1) if learned_sigma else eps

    return model

@pytest.mark.parametrize("sampler", ["pc", "ode"])
def test_eps_model_on_discrete_vp_reproduces_gaussian(sampler):
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)
    sde = VPSDE.from_alphas_cumprod(ac)
    score = eps_model_score(analytic_eps_model(ac), sde)
    kw = {"steps": 500} if sampler == "pc" else {}
    x = SCORE_SAMPLERS[sampler](score, sde, prior(sde), generator=gen(), **kw)
    check_moments(x, MU, COV)

def test_eps_model_passes_labels_and_matches_exact_score():
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)
    sde = DiscreteVPSDE(ac)
    seen = {}
    inner = analytic_eps_model(ac)

    def model(x, timesteps, y=None, extra=None):
        seen.update(y=y, extra=extra)
        return inner(x, timesteps)

    x, t = torch.randn(5, 2, dtype=DT, generator=gen()), torch.full((5,), 0.37, dtype=DT)
    score = eps_model_score(model, sde, y=torch.arange(5), model_kwargs={"extra": 1})
    assert torch.allclose(score(x, t), gaussian(sde).score(x, t), rtol=1e-6)
    assert torch.equal(seen["y"], torch.arange(5)) and seen["extra"] == 1
    eps = score_from_eps(lambda x, t: -gaussian(sde).score(x, t) * sde.marginal(t)[1][:, None], sde)
    assert torch.allclose(eps(x, t), gaussian(sde).score(x, t))

def test_ncsn_score_maps_time_to_ladder_labels():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    sde = VESDE(0.01, 1.0)
    score = LadderModel(Ladder(sigmas)).score(lambda x, labels: labels[:, None].to(x.dtype).expand_as(x))
    t = sde.t_of_sigma(sigmas)
    got = score(torch.zeros(10, 2, dtype=DT), t)[:, 0]
    assert torch.equal(got, torch.arange(10, dtype=DT))
    assert torch.allclose(sigmas[[0, -1]], torch.tensor([1.0, 0.01], dtype=DT))

# --- losses ---------------------------------------------------------------

def test_dsm_loss_is_minimal_at_the_exact_score():
    sde = VPSDE()
    gmm = gaussian(sde)
    x0 = MU + torch.randn(40000, 2, dtype=DT, generator=gen(5)) @ torch.linalg.cholesky(COV).T
    exact = dsm_loss(gmm.score, sde, x0, generator=gen(6))
    worse = dsm_loss(lambda x, t: 1.1 * gmm.score(x, t), sde, x0, generator=gen(6))
    assert exact < worse

    # Analytic minimum: E_t[D - sigma_t^2 tr(C_t^{-1})], C_t = alpha^2 S + sigma^2 I.
    def integrand(t):
        a, s = (float(v) for v in sde.marginal(torch.tensor([t], dtype=DT)))
        return 2 - s**2 * torch.trace(torch.linalg.inv(a**2 * COV + s**2 * torch.eye(2, dtype=DT))).item()

    ref = integrate.quad(integrand, 1e-5, 1.0)[0] / (1 - 1e-5)
    # Per-sample loss has std < 2 here, so the MC standard error is < 0.01 at 40000 samples.
    assert abs(float(exact) - ref) < 0.03, (exact, ref)

def test_ncsn_loss_is_minimal_at_the_exact_score():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    ve = VESDE(0.01, 1.0)
    gmm = gaussian(ve)
    model = lambda x, labels: gmm.score(x, ve.t_of_sigma(sigmas[labels]))
    x0 = MU + torch.randn(40000, 2, dtype=DT, generator=gen(5)) @ torch.linalg.cholesky(COV).T
    exact = ncsn_loss(model, sigmas, x0, generator=gen(6))
    worse = ncsn_loss(lambda x, lab: 0.9 * model(x, lab), sigmas, x0, generator=gen(6))
    assert exact < worse
    eye = torch.eye(2, dtype=DT)
    ref = np.mean([0.5 * (2 - s**2 * torch.trace(torch.linalg.inv(COV + s**2 * eye)).item())
                   for s in sigmas.tolist()])
    assert abs(float(exact) - ref) < 0.02, (exact, ref)

# --- bad input ------------------------------------------------------------

def test_bad_inputs_raise_guided_error():
    sde, score = VPSDE(), gaussian(VPSDE()).score
    x = torch.zeros(4, 2, dtype=DT)
    cases = [
        lambda: sdedit(score, sde, x, t0=0.0),
        lambda: sdedit(score, sde, x, t0=1.5),
        lambda: sdedit(score, sde, x, mask=torch.ones(3)),
        lambda: sdedit(score, sde, x, mask=torch.full((2,), 2.0)),
        lambda: pc_sampler(score, sde, x, steps=0),
        lambda: pc_sampler(score, sde, x, steps=5, predictor="leapfrog"),
        lambda: pc_sampler(score, sde, x, steps=5, predictor=None, corrector=None),
        lambda: annealed_langevin(score, sde, x),
        lambda: ode_likelihood(score, sde, x, unit="nat"),
        lambda: ode_likelihood(score, sde, x, hutchinson="bernoulli"),
        lambda: dsm_loss(score, sde, x, weighting="uniform"),
        lambda: VPSDE(beta_min=20, beta_max=0.1),
        lambda: VESDE(sigma_min=1.0, sigma_max=0.5),
        lambda: make_sde("edm"),
        lambda: DiscreteVPSDE(torch.tensor([0.5, 0.9])),
        lambda: geometric_sigmas(0.01, 1.0, 10),
        lambda: Ladder([0.1, 1.0]),
        lambda: eps_model_score(lambda x, t: torch.zeros(4, 3), sde)(x, torch.ones(4, dtype=DT) * 0.5),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(GuidedError):
            case()
            pytest.fail(f"case {i} did not raise")
