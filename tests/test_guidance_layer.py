"""The guidance layer (guided/guidance.py) on a Gaussian mixture with exact networks, through the
application's own path (generate.sample_batch), in every sampler.

- An interval covering every noise level is full guidance; an empty one is none (every term, sampler).
- Autoguidance of an exact Gaussian by the same Gaussian with inflated variance: the guided score is
  linear, so the sampled law is Gaussian with a variance an ODE gives exactly (oracle below).
- x0-classifier guidance through the exact denoiser tends to the clean posterior's gradient as noise -> 0.
- Calibration recovers a known temperature; guidance divides the logits by it.
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from guided.guidance.calibration import Calibration, calibrate, expected_calibration_error, fit_temperature
from guided.config import DiffusionConfig, node
from guided.diffusion.gaussian import create_diffusion
from guided.generation import Pipeline, SampleOptions, sample_batch
from guided.generation.pipeline import guided_functions
from guided.diffusion.models import vp_sigma
from guided.guidance.terms import Guidance, Term, classifier_grad
from guided.diffusion.ladder import geometric_sigmas
from guided.diffusion.sde import DiscreteVPSDE
from mixture_nets import LadderClassifier, MixtureClassifier, MixtureEps, MixtureNCSN

DIFF = node(DiffusionConfig, dict(noise_schedule="cosine", variance="fixed_small"))
ABAR = create_diffusion(DIFF, "").alphas_cumprod
SAMPLERS = ("ddpm", "ddim", "dpm++", "pc", "ode")
EMPTY = (1e9, 1e10)  # above the largest sigma of the schedule (about 2e4): no level inside


def pipeline(**kw):
    nets = dict(classifier=MixtureClassifier(ABAR), weak_model=MixtureEps(ABAR, inflate=2.25),
                x0_classifier=MixtureClassifier(ABAR))
    return Pipeline(MixtureEps(ABAR), DIFF, **{**nets, **kw})


TERMS = {  # term -> (options with it on, options with it off, interval field)
    "classifier": (dict(scale=2.0), dict(scale=0.0), "interval"),
    "cfg": (dict(cfg_scale=2.0), dict(cfg_scale=1.0), "cfg_interval"),
    "autoguide": (dict(autoguide_scale=2.0), dict(autoguide_scale=1.0), "autoguide_interval"),
    "x0_classifier": (dict(x0_scale=2.0), dict(x0_scale=0.0), "x0_interval"),
}


def draw(p, sampler, n=8, steps="10", **opts):
    o = SampleOptions(sampler=sampler, steps=None if sampler == "ode" else steps, clip="none", **opts)
    if sampler == "ode":
        o.settings = dict(rtol=1e-4, atol=1e-4)
    labels = [0, 1] * (n // 2)
    return sample_batch(p, labels, range(100, 100 + n), o)


@pytest.mark.parametrize("term", list(TERMS))
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_full_interval_is_full_guidance_and_an_empty_one_is_none(sampler, term):
    on, off, field = TERMS[term]
    p = pipeline(unconditional=term != "cfg")  # guidance moves the null class's samples most
    full, none = draw(p, sampler, **on), draw(p, sampler, **off)
    assert not torch.allclose(full, none, atol=1e-3), "the term must change the samples for this test to mean much"
    assert torch.allclose(draw(p, sampler, **on, **{field: (0.0, math.inf)}), full, atol=1e-5)
    assert torch.allclose(draw(p, sampler, **on, **{field: EMPTY}), none, atol=1e-6)


def test_langevin_interval_on_the_ncsn_ladder():
    sigmas = geometric_sigmas(2.0, 0.02, 10).float()
    p = Pipeline(MixtureNCSN(sigmas), DIFF, LadderClassifier(sigmas), objective="ncsn", ncsn_sigmas=sigmas)

    def run(**kw):
        o = SampleOptions(sampler="langevin", clip="none", settings=dict(n_steps_each=5), **kw)
        return sample_batch(p, [0, 1] * 4, range(8), o)
    full, none = run(scale=2.0), run(scale=0.0)
    assert not torch.allclose(full, none, atol=1e-3)
    assert torch.allclose(run(scale=2.0, interval=(0.0, math.inf)), full, atol=1e-5)
    assert torch.allclose(run(scale=2.0, interval=EMPTY), none, atol=1e-6)
    half = run(scale=2.0, interval=(0.5, math.inf))  # guided only on the upper rungs
    assert not torch.allclose(half, full, atol=1e-3) and not torch.allclose(half, none, atol=1e-3)


def test_terms_compose_as_a_sum_of_corrections():
    """cfg + autoguide + classifier with an interval: the documented composition, checked by hand."""
    p = pipeline()
    y, t = torch.tensor([0, 1, 1]), torch.tensor([100, 500, 900])
    x = torch.randn(3, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    opts = SampleOptions(cfg_scale=1.5, autoguide_scale=2.0, scale=3.0, interval=(0.5, 5.0))
    model_fn, cond_fn = guided_functions(p, y, opts)
    main, null, weak = p.model(x, t, y), p.model(x, t, torch.full_like(y, 2)), p.weak_model(x, t, y)
    assert torch.allclose(model_fn(x, t), main + 0.5 * (main - null) + 1.0 * (main - weak), atol=1e-6)
    sigma = vp_sigma(ABAR)(t)
    inside = ((sigma >= 0.5) & (sigma <= 5.0)).float().view(-1, 1, 1, 1)
    assert 0 < inside.sum() < 3
    assert torch.allclose(cond_fn(x, t), 3.0 * inside * classifier_grad(p.classifier, x, t, y), atol=1e-6)


# -- autoguidance against an exact oracle --------------------------------------------------------
S, S_WEAK, W = 0.04, 0.09, 2.0  # main N(m, S I), weak N(m, S_WEAK I), autoguidance weight w


def oracle_std(stochastic: bool) -> float:
    """The std of the law sampled with eps_m + (w - 1)(eps_m - eps_w) for Gaussians N(m, S I), N(m, S' I).

    The guided score is s = -(x - a m) P_t with P_t = w / (a^2 S + s^2) - (w - 1) / (a^2 S' + s^2), so
    u = x - a m obeys, on the VP SDE with beta(t) (f = -beta x / 2, g^2 = beta, da/dt = -beta a / 2):
      probability flow  du/dt = beta u (P_t - 1) / 2       -> std_0 = exp(-int_0^T beta (P - 1) / 2 dt)
      reverse SDE       dV/dt = 2 beta (P_t - 1/2) V - beta, integrated from V_T = 1 down to t = 0.
    (With w = 1 both give sqrt(S): the oracle's own check, in the test.)"""
    sde = DiscreteVPSDE(ABAR)
    eps_t = 1.0 / len(ABAR)

    def beta_p(t, w):
        tt = torch.tensor([t], dtype=torch.float64)
        a, s = (v.item() for v in sde.marginal(tt))
        return sde.beta(tt).item(), w / (a * a * S + s * s) - (w - 1) / (a * a * S_WEAK + s * s)

    def std(w):
        if not stochastic:  # log std, integrated from t = T down to eps (beta is piecewise constant)
            sol = integrate.solve_ivp(lambda t, v: [(lambda b, p: 0.5 * b * (p - 1))(*beta_p(t, w))],
                                      (1.0, eps_t), [0.0], rtol=1e-8, atol=1e-10)
            return math.exp(sol.y[0, -1])
        sol = integrate.solve_ivp(lambda t, v: [(lambda b, p: 2 * b * (p - 0.5) * v[0] - b)(*beta_p(t, w))],
                                  (1.0, eps_t), [1.0], rtol=1e-8, atol=1e-10)
        return math.sqrt(sol.y[0, -1])
    assert abs(std(1.0) - math.sqrt(S)) < 2e-3 * math.sqrt(S)
    return std(W)


@pytest.mark.parametrize("sampler, steps, stochastic", [("ddim", "250", False), ("dpm++", "quad50", False),
                                                        ("ode", "", False), ("ddpm", "500", True),
                                                        ("pc", "500", True)])
def test_autoguidance_moves_a_gaussian_as_theory_says(sampler, steps, stochastic):
    one = dict(means=torch.tensor([[0.3, -0.2]]), weights=torch.tensor([1.0]))
    p = Pipeline(MixtureEps(ABAR, variances=torch.tensor([S]), **one), DIFF,
                 weak_model=MixtureEps(ABAR, variances=torch.tensor([S_WEAK]), **one))
    n = 1000 if sampler in ("ode", "pc") else 2000
    # pc without its Langevin corrector: with guidance the corrector targets the tilted marginal at each t,
    # not the reverse SDE's law that the oracle integrates
    extra = {"ode": dict(rtol=1e-5, atol=1e-5), "pc": dict(corrector="none")}.get(sampler, {})
    o = SampleOptions(sampler=sampler, steps=steps or (None if sampler == "ode" else "100"), clip="none", autoguide_scale=W, settings=extra)
    x = sample_batch(p, [0] * n, range(n), o).reshape(n, 2)
    want = oracle_std(stochastic)
    assert want < math.sqrt(S) * 0.9  # autoguidance at w > 1 sharpens: the effect tested is real
    se = want / math.sqrt(2 * 2 * n)  # std of a sample std, 2 coordinates
    assert abs(x.std(0).mean().item() - want) < 5 * se + 0.02 * want, (x.std(0), want)
    assert torch.allclose(x.mean(0), torch.tensor([0.3, -0.2]), atol=5 * want / math.sqrt(n))


# -- x0-classifier guidance ----------------------------------------------------------------------
def test_x0_classifier_guidance_tends_to_the_clean_posterior_gradient():
    """grad_x log p(y | x0_hat(x_t)) through the exact denoiser -> grad_x log p_0(y | x) as sigma -> 0."""
    p = pipeline(unconditional=True)
    y = torch.tensor([0, 1] * 32)
    x = (p.model.means[y].float() + 0.3 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1)))
    x = x.view(64, 2, 1, 1)
    clean = MixtureClassifier(ABAR)
    exact = classifier_grad(clean, x, torch.zeros(64, dtype=torch.long), y)
    errors = []
    for t in (20, 2, 0):  # sigma = 0.08, 0.013, 0.006 on the cosine schedule
        _, cond_fn = guided_functions(p, y, SampleOptions(x0_scale=1.0))
        g = cond_fn(x, torch.full((64,), t))
        errors.append(((g - exact).norm() / exact.norm()).item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.02 and errors[0] > 0.2, errors


# -- calibration ---------------------------------------------------------------------------------
def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(20000, 5, generator=g)  # calibrated logits
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    for true_t in (0.5, 2.5):
        assert abs(fit_temperature(z * true_t, labels) - true_t) < 0.05 * true_t
    assert expected_calibration_error(z * 2.5, labels) > 5 * expected_calibration_error(z, labels)


def test_a_band_without_errors_keeps_temperature_one():
    """All correct: the likelihood rises without bound as T -> 0, so there is nothing to fit (T stays 1)."""
    z = 5 * torch.randn(2000, 4, generator=torch.Generator().manual_seed(0))
    cal, report = calibrate(z, z.argmax(-1), torch.zeros(2000), [0, 1])
    assert cal.temperature.tolist() == [1.0] and report[0]["errors"] == 0


def test_calibrate_fits_one_temperature_per_band_and_guidance_uses_it():
    g = torch.Generator().manual_seed(1)
    n, temps = 24000, torch.tensor([0.8, 2.0, 4.0])
    t = torch.randint(0, 300, (n,), generator=g)
    z = 1.5 * torch.randn(n, 4, generator=g)
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)
    cal, report = calibrate(z * temps[t // 100, None], labels, t.double(), [0, 100, 200, 300])
    assert torch.allclose(cal.temperature, temps, rtol=0.08), cal.temperature
    assert all(r["ece_after"] < r["ece_before"] for r in report[1:])
    assert torch.equal(cal.temperature_at(torch.tensor([0, 99, 100, 250, 299])), cal.temperature[[0, 0, 1, 2, 2]])
    # guidance divides the classifier's logits by the temperature of each sample's timestep
    clf = MixtureClassifier(ABAR)
    clf.calibration = Calibration(torch.tensor([0.0, 500.0, 1000.0]), torch.tensor([2.0, 5.0]))
    x, y, tt = torch.randn(2, 2, 1, 1), torch.tensor([0, 1]), torch.tensor([100, 800])
    cond = Guidance([Term("classifier", 1.0, clf)], vp_sigma(ABAR)).cond_fn(y)
    want = classifier_grad(clf, x, tt, y, torch.tensor([2.0, 5.0]))
    assert torch.allclose(cond(x, tt), want, atol=1e-6)
    plain = Guidance([Term("classifier", 1.0, clf, calibrated=False)], vp_sigma(ABAR)).cond_fn(y)
    assert not torch.allclose(plain(x, tt), want, atol=1e-4)


def test_bad_terms_are_one_line_errors():
    from guided.errors import GuidedError

    for kw in (dict(kind="nope", scale=1.0), dict(kind="classifier", scale=1.0, network=object(), interval=(2, 1)),
               dict(kind="classifier", scale=math.nan, network=object()), dict(kind="autoguide", scale=2.0),
               dict(kind="classifier", scale=1.0, network=object(), schedule="zigzag")):
        with pytest.raises(GuidedError):
            Term(**kw)
    with pytest.raises(GuidedError, match="label dropout"):
        Guidance([Term("cfg", 2.0)], vp_sigma(ABAR))
    assert np.isfinite(vp_sigma(ABAR)(torch.tensor([0, 999])).numpy()).all()
