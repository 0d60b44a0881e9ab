"""Samplers and the likelihood of score-based models, on continuous SDE time.

The registry's entries (`run_pc`, `run_ode`, `run_langevin`: the guided denoiser and the levels, see
guided/samplers/registry.py) run the functions below. Each is a short function with one signature,

    sampler(score_fn, sde, x_T, *, steps, generator=None, progress=False, **opts) -> x_0

over a score callable `score_fn(x, t)` (guided.diffusion.models.ScoreModel.score) and an SDE
(guided/diffusion/sde.py). Guidance is applied by wrapping `score_fn`, never here; the sampler
guided denoiser (guided.guidance.denoiser.GuidedDenoiser.score) does that.
References: [SDE] Song et al. 2021 (ICLR), score-based generative modeling
through SDEs; [NCSN] Song & Ermon 2019; [SDEdit] Meng et al. 2022.
All randomness comes from `generator` (a torch.Generator on x's device).
"""

import math

import numpy as np
import torch
from scipy import integrate
from tqdm.auto import tqdm

from guided.errors import GuidedError
from guided.diffusion.ladder import geometric_sigmas
from guided.diffusion.sde import VESDE, expand_as
from guided.samplers.sdedit import check_mask, check_t0, sde_start


def _randn(x, generator):
    if hasattr(generator, "randn_like"):  # one generator per sample (guided.samplers.noise.SampleNoise)
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _bar(iterable, progress, desc):
    return tqdm(iterable, desc=desc, leave=False) if progress else iterable


def _tvec(x, t):
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)


def _kernel(sde, t, s):
    """(a, std) of p(x_t | x_s); s=None means the clean data x_0."""
    return sde.marginal(t) if s is None else sde.transition(t, s)


def _batch_norm(v):
    return v.reshape(v.shape[0], -1).norm(dim=-1).mean()


# --- predictors and corrector: one step from time t down to s (s=None: to x_0) ---


def reverse_diffusion_step(score_fn, sde, x, t, s, generator=None):
    """Reverse diffusion predictor ([SDE] App. E) in its ancestral form: the forward
    step s -> t is x_t = a x_s + G_i z, G_i the std of p(x_t | x_s) (for VE a = 1 and
    G_i^2 = sigma_t^2 - sigma_s^2, Algorithm 2); its reverse is
    x_s = (x_t + G_i^2 s(x_t, t)) / a + G_i z ([SDE] App. F's ancestral sampler for VP).
    The division, rather than the first-order (2 - a) x_t, keeps a long step exact
    where beta is large (the last steps of a cosine schedule, a ~ 0.003).
    Returns (x_s, mean of x_s)."""
    a, std = _kernel(sde, t, s)
    a, g2 = expand_as(a, x), expand_as(std**2, x)
    x_mean = (x + g2 * score_fn(x, t)) / a
    return x_mean + g2.sqrt() * _randn(x, generator), x_mean


def euler_maruyama_step(score_fn, sde, x, t, s, generator=None):
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dw ([SDE] eq. 6)."""
    dt = expand_as(t - (0 if s is None else s), x)
    x_mean = x - sde.reverse_drift(x, t, score_fn(x, t)) * dt
    g = expand_as(sde.diffusion(t), x)
    return x_mean + g * dt.sqrt() * _randn(x, generator), x_mean


PREDICTORS = {"reverse_diffusion": reverse_diffusion_step, "euler_maruyama": euler_maruyama_step}


def langevin_correct(score_fn, sde, x, t, s, *, snr, n_steps, generator=None):
    """Langevin corrector ([SDE] Algorithms 4 (VE) and 5 (VP)): n_steps of
    x <- x + e grad + sqrt(2e) z with e = 2 alpha (snr ||z|| / ||grad||)^2, where
    alpha = a^2 of the step (1 - beta_i for VP, 1 for VE) and norms are batch means."""
    a, _ = _kernel(sde, t, s)
    alpha = expand_as(a**2, x)
    for _ in range(n_steps):
        grad, z = score_fn(x, t), _randn(x, generator)
        e = 2 * alpha * (snr * _batch_norm(z) / _batch_norm(grad)) ** 2
        x = x + e * grad + (2 * e).sqrt() * z
    return x


def _reverse_sde(score_fn, sde, x, times, *, predictor, corrector, snr, n_corrector,
                 denoise, generator, progress, project=None, desc="pc"):
    """The PC loop ([SDE] Algorithm 1) over decreasing `times`, ending at x_0.

    As score_sde does, each step corrects at t_i then predicts to t_{i+1}; the
    last predictor step goes from t = eps to x_0 and 'denoise' returns its mean
    (no noise added; [SDE] App. G). `project(x, s)` is applied after each step.
    """
    if predictor is not None and predictor not in PREDICTORS:
        raise GuidedError(f"unknown predictor {predictor!r}: use one of {sorted(PREDICTORS)} or None")
    if corrector not in (None, "langevin"):
        raise GuidedError(f"unknown corrector {corrector!r}: use 'langevin' or None")
    if predictor is None and corrector is None:
        raise GuidedError("PC sampling needs a predictor, a corrector, or both")
    x_mean = x
    for i in _bar(range(len(times)), progress, desc):
        t = _tvec(x, times[i])
        s = _tvec(x, times[i + 1]) if i + 1 < len(times) else None
        if corrector is not None:
            x = x_mean = langevin_correct(score_fn, sde, x, t, s, snr=snr,
                                          n_steps=n_corrector, generator=generator)
        if predictor is not None:
            x, x_mean = PREDICTORS[predictor](score_fn, sde, x, t, s, generator)
        if project is not None:
            x, x_mean = project(x, s), project(x_mean, s)
    return x_mean if denoise else x


def _check_steps(steps, name="steps"):
    if not isinstance(steps, int) or steps < 1:
        raise GuidedError(f"{name} must be a positive integer, got {steps!r}")


@torch.no_grad()
def pc_sampler(score_fn, sde, x_T, *, steps=1000, predictor="reverse_diffusion",
               corrector="langevin", snr=0.16, n_corrector=1, denoise=True,
               generator=None, progress=False):
    """Predictor-corrector sampling ([SDE] Algorithms 1-3) from T to eps.

    predictor: 'reverse_diffusion' | 'euler_maruyama' | None; corrector:
    'langevin' | None, with signal-to-noise ratio `snr` and `n_corrector` steps.
    score_sde defaults: snr 0.16 (VE, CIFAR-10), 0.01 for VP with Langevin.
    """
    _check_steps(steps)
    times = torch.linspace(sde.T, sde.eps, steps).tolist()
    return _reverse_sde(score_fn, sde, x_T, times, predictor=predictor, corrector=corrector,
                        snr=snr, n_corrector=n_corrector, denoise=denoise,
                        generator=generator, progress=progress)


def _solve(fun, t_span, y0, *, rtol, atol, method, progress, desc):
    bar = tqdm(desc=desc, unit="nfe", leave=False) if progress else None

    def counted(t, y):
        if bar is not None:
            bar.update()
        return fun(t, y)

    sol = integrate.solve_ivp(counted, t_span, y0, rtol=rtol, atol=atol, method=method)
    if bar is not None:
        bar.close()
    if not sol.success:
        raise GuidedError(f"ODE solver failed ({sol.message}): loosen rtol/atol or check the score")
    return sol.y[:, -1], sol.nfev


@torch.no_grad()
def ode_sampler(score_fn, sde, x_T, *, steps=None, rtol=1e-5, atol=1e-5, method="RK45",
                denoise=True, generator=None, progress=False):
    """Probability-flow ODE dx/dt = f - g^2 s / 2 ([SDE] eq. 13) solved from T to
    eps with scipy's adaptive `solve_ivp` (score_sde: RK45, rtol = atol = 1e-5),
    then one reverse-diffusion step to x_0 (its mean) if `denoise`.
    `steps` is unused (the solver picks its own) and kept for the shared signature.
    """
    shape, dtype, device = x_T.shape, x_T.dtype, x_T.device

    def fun(t, y):
        x = torch.from_numpy(y).reshape(shape).to(device, dtype)
        tv = _tvec(x, t)
        return sde.reverse_drift(x, tv, score_fn(x, tv), probability_flow=True).double().cpu().numpy().ravel()

    y, _ = _solve(fun, (sde.T, sde.eps), x_T.double().cpu().numpy().ravel(), rtol=rtol,
                  atol=atol, method=method, progress=progress, desc="ode")
    x = torch.from_numpy(y).reshape(shape).to(device, dtype)
    if denoise:
        _, x = reverse_diffusion_step(score_fn, sde, x, _tvec(x, sde.eps), None, generator)
    return x


def _divergence(fn, x, probe):
    """div fn at x: Hutchinson-Skilling ([SDE] App. D.2) E[p^T (d fn/dx) p] with
    a fixed probe p, or exactly (probe None: one backward pass per dimension)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x).reshape(x.shape[0], -1)
        if probe is not None:
            p = probe.reshape(x.shape[0], -1)
            g = torch.autograd.grad((out * p).sum(), x)[0].reshape(x.shape[0], -1)
            return (g * p).sum(dim=1), out.detach()
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for j in range(out.shape[1]):
            g = torch.autograd.grad(out[:, j].sum(), x, retain_graph=True)[0]
            div += g.reshape(x.shape[0], -1)[:, j]
        return div, out.detach()


def ode_likelihood(score_fn, sde, x, *, unit="bpd", hutchinson="rademacher", rtol=1e-5,
                   atol=1e-5, eps=None, method="RK45", dequantize=False, generator=None,
                   progress=False):
    """Exact likelihood through the probability-flow ODE ([SDE] Sec. 4.3, App. D.2):
    log p_0(x) = log p_T(x_T) + int_eps^T div f~(x_t, t) dt, f~ = f - g^2 s / 2.

    unit='nats': the negative log-likelihood per sample (toy data).
    unit='bpd': bits/dim for images in [-1, 1] with 256 levels, score_sde's
    convention bpd = nll / (D ln 2) + 7, the 7 = log2(256 / 2) undoing the
    rescaling of [0, 255] to [-1, 1]; `dequantize` first spreads each 8-bit level
    uniformly over its bin, x01 -> (255 x01 + u) / 256, as score_sde's eval does.
    hutchinson: 'rademacher' | 'gaussian' (one probe per sample, fixed along the
    path) | 'exact' (D backward passes per evaluation; small D only).
    eps: start time of the ODE, default `sde.likelihood_eps` (1e-5; 1/N discrete).
    Returns a tensor [N].
    """
    if unit not in ("bpd", "nats"):
        raise GuidedError(f"unknown likelihood unit {unit!r}: use 'bpd' or 'nats'")
    if hutchinson not in ("rademacher", "gaussian", "exact"):
        raise GuidedError(f"unknown trace estimator {hutchinson!r}: use rademacher, gaussian or exact")
    shape, dtype, device, n = x.shape, x.dtype, x.device, x.shape[0]
    eps = sde.likelihood_eps if eps is None else eps
    if dequantize:
        x01 = (x + 1) / 2
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        x = 2 * (u + 255 * x01) / 256 - 1
    probe = None
    if hutchinson == "gaussian":
        probe = _randn(x, generator)
    elif hutchinson == "rademacher":
        probe = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1

    def fun(t, y):
        xt = torch.from_numpy(y[:-n]).reshape(shape).to(device, dtype)
        tv = _tvec(xt, t)
        drift = lambda v: sde.reverse_drift(v, tv, score_fn(v, tv), probability_flow=True)
        div, dx = _divergence(drift, xt, probe)
        return np.concatenate([dx.double().cpu().numpy().ravel(), div.double().cpu().numpy()])

    y0 = np.concatenate([x.detach().double().cpu().numpy().ravel(), np.zeros(n)])
    y, _ = _solve(fun, (eps, sde.T), y0, rtol=rtol, atol=atol, method=method,
                  progress=progress, desc="likelihood")
    z = torch.from_numpy(y[:-n]).reshape(shape).to(device, dtype)
    delta = torch.from_numpy(y[-n:]).to(device, dtype)
    nll = -(sde.prior_logp(z) + delta)
    if unit == "nats":
        return nll
    return nll / (x[0].numel() * math.log(2)) + 7.0


@torch.no_grad()
def annealed_langevin(score_fn, sde, x_T, *, steps=10, n_steps_each=100, step_lr=2e-5,
                      sigmas=None, denoise=True, generator=None, progress=False):
    """Annealed Langevin dynamics ([NCSN] Algorithm 1) on a VE SDE.

    `steps` noise levels: the ladder geometric_sigmas(sigma_max, sigma_min, steps)
    of `sde` (or an explicit decreasing `sigmas`), queried at t = sde.t_of_sigma.
    At level i, alpha_i = step_lr sigma_i^2 / sigma_L^2 and n_steps_each updates
    x <- x + alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z (the paper's form; the
    ncsn code's step_lr is half of this alpha). `denoise` ends with one Tweedie
    step x + sigma_L^2 s(x, sigma_L) (Jolicoeur-Martineau et al. 2021; NCSNv2).
    """
    if not isinstance(sde, VESDE):
        raise GuidedError("annealed Langevin needs a VE SDE (NCSN noise ladder); use VESDE")
    if sigmas is None:
        _check_steps(steps)
        sigmas = geometric_sigmas(sde.sigma_max, sde.sigma_min, steps)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if sigmas.numel() == 0 or not torch.all(sigmas[1:] < sigmas[:-1]):
        raise GuidedError("sigmas must be a non-empty decreasing ladder")
    x, sigma_L = x_T, float(sigmas[-1])
    for sigma in _bar(sigmas.tolist(), progress, "langevin"):
        t = _tvec(x, sde.t_of_sigma(sigma))
        alpha = step_lr * sigma**2 / sigma_L**2
        for _ in range(n_steps_each):
            x = x + 0.5 * alpha * score_fn(x, t) + math.sqrt(alpha) * _randn(x, generator)
    if denoise:
        x = x + sigma_L**2 * score_fn(x, _tvec(x, sde.t_of_sigma(sigma_L)))
    return x


@torch.no_grad()
def sdedit(score_fn, sde, x_guide, *, steps=500, t0=0.5, mask=None, predictor="reverse_diffusion",
           corrector=None, snr=0.16, n_corrector=1, denoise=True, generator=None, progress=False):
    """SDEdit ([SDEdit] Sec. 3; appendix algorithms): perturb the guide to time t0 * T,
    x = alpha x_g + sigma z, and run the reverse SDE from there to x_0 in `steps`
    steps. With `mask` (broadcastable to x_guide, values in [0, 1]) only the
    region where mask = 1 is edited: elsewhere x is reset after every step to the
    guide re-noised to that step's level with the same z (as the SDEdit code
    does; note its mask marks the kept region instead), and to the guide at the end.
    """
    t0 = check_t0(t0)
    _check_steps(steps)
    if mask is not None:
        mask = check_mask(mask, x_guide)
    x, times, project = sde_start(sde, x_guide, _randn(x_guide, generator), t0, steps, mask)
    return _reverse_sde(score_fn, sde, x, times, predictor=predictor, corrector=corrector, snr=snr,
                        n_corrector=n_corrector, denoise=denoise, generator=generator, progress=progress,
                        project=project, desc="sdedit")



# -- the registry's entries: the guided denoiser and the levels ---------------------------------------
def _off(name):
    return None if name == "none" else name


@torch.no_grad()
def run_pc(den, x, levels, *, noise, after_step=None, callback=None, progress=False, predictor="reverse_diffusion",
           corrector="langevin", snr=0.16, n_corrector=1):
    """Predictor-corrector over the levels' SDE times (SDEdit: from its start time, the mask kept by
    `after_step`)."""
    predictor, corrector = _off(predictor), _off(corrector)
    if predictor is None and corrector is None:
        raise GuidedError("pc needs a predictor, a corrector, or both (predictor=none with corrector=none)")
    return _reverse_sde(den.score(), den.model.sde, x, levels.times, predictor=predictor, corrector=corrector,
                        snr=snr, n_corrector=n_corrector, denoise=True, generator=noise, progress=progress,
                        project=after_step, desc="pc")


def run_ode(den, x, levels, *, noise, after_step=None, callback=None, progress=False, rtol=1e-5, atol=1e-5):
    return ode_sampler(den.score(), den.model.sde, x, rtol=rtol, atol=atol, generator=noise, progress=progress)


def run_langevin(den, x, levels, *, noise, after_step=None, callback=None, progress=False, n_steps_each=100,
                 step_lr=2e-5):
    return annealed_langevin(den.score(), den.model.sde, x, sigmas=levels.ladder, n_steps_each=n_steps_each,
                             step_lr=step_lr, generator=noise, progress=progress)
