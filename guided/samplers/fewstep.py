"""Few-step samplers made for guidance, on the noise level sigma of an eps model's discrete VP chain.

Each is a plain function `sampler(denoise, sigmas, x, *, noise, ...) -> x_0` over a data prediction
D(x; sigma) (the guided denoiser, guided/guidance/denoiser.py) and a decreasing list of noise levels ending in 0, in the variables of Karras et al. 2022 (EDM):
x = x_vp / alpha_t = x_0 + sigma n with sigma = sqrt((1 - abar_t) / abar_t), where the data
prediction D(x; sigma) is the x0 estimate. The levels are those of the respaced chain of `--steps`
(any respacing of guided.diffusion.gaussian, e.g. "20", "quad20", "karras20", "logsnr20"), so the
networks only ever see the original timesteps they were trained on; EDM's stochastic sampler
rounds its raised level to the nearest timestep of the whole chain (EDM's round_sigma for
discrete-time models).

  dpm++2m-sde  DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", App. on SDE solvers; the
               midpoint form): per step, with h = lambda_next - lambda, lambda = -log sigma,
               x' = (s'/s) e^{-eta h} x + (1 - e^{-(1+eta) h}) (D + D1 / 2) + s' sqrt(1 - e^{-2 eta h}) z,
               D1 = (D - D_prev) h / h_prev; eta = 1 (the reverse SDE; 0 gives DPM-Solver++(2M)).
  dpm++3m      DPM-Solver++(3M), the third-order multistep ODE solver in data prediction (Lu et al.
               2022 eq. for the multistep third-order update): x' = (s'/s) x - phi1 D + phi2 D1 - phi3 D2,
               phi1 = expm1(-h), phi2 = phi1 / h + 1, phi3 = phi2 / h - 1/2, with first and second
               divided differences D1, D2 of the last three predictions; first and second order at the
               start, second order in the last step (DPM-Solver's lower_order_final).
  edm          EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): raise sigma by gamma =
               min(S_churn / N, sqrt 2 - 1) for sigma in [S_tmin, S_tmax] with fresh noise of scale
               S_noise, then one Heun step of the probability-flow ODE dx/dsigma = (x - D) / sigma
               (Euler into sigma = 0). N levels cost 2N - 1 network evaluations.

GUIDANCE, the same for all three, where DPM-Solver++ applies it (Lu et al. 2022 sec. 4: guided
sampling in data prediction): GuidedDenoiser.x0 corrects the network's eps by the gradient terms
(Dhariwal & Nichol Algorithm 2) and clips D = x - sigma eps_hat as the one clip setting says, where the
data space has a range: "dynamic" (these samplers' default; Saharia et al. 2022 sec. 2.3), "static"
or "none". In EDM's sampler the same guided D enters dx/dsigma = (x - D) / sigma, i.e. the guided
score (D - x) / sigma^2 = score + cond_fn * alpha.

Settings (declared in the registry, --sampler-arg KEY=VALUE on the command line): eta (dpm++2m-sde);
churn, s_noise, s_tmin, s_tmax (edm; defaults: EDM Table 5's ImageNet-64 ADM settings, S_churn 80,
S_tmin 0.05, S_tmax 50, S_noise 1.003). Noise is drawn with per-sample generators, so a seed gives
the same image at any batch size.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

EDM_DEFAULTS = dict(churn=80.0, s_noise=1.003, s_tmin=0.05, s_tmax=50.0)  # EDM Table 5, ImageNet-64


def _loop(sigmas, progress: bool):
    return tqdm(range(len(sigmas) - 1), disable=not progress, desc="reverse steps", leave=False)


def _finish(x, i, sigmas, after_step, callback, x0):
    """SDEdit's after_step sees chain index len(sigmas) - 2 - i, as the discrete samplers' steps."""
    if after_step is not None:
        x = after_step(len(sigmas) - 2 - i, x, sigmas[i + 1])
    if callback is not None:
        callback(i, x, x0)
    return x


def dpmpp_2m_sde(denoise, sigmas, x, *, noise, eta: float = 1.0, after_step=None, callback=None,
                 progress=False, **_) -> torch.Tensor:
    """DPM-Solver++(2M) SDE over the levels `sigmas` (decreasing, last 0), from x at sigmas[0]."""
    prev, h_prev = None, None
    for i in _loop(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        if s_next == 0:
            x = d
        else:
            h = math.log(s / s_next)
            keep = -math.expm1(-h - eta * h)  # 1 - e^{-(1 + eta) h}
            x = (s_next / s) * math.exp(-eta * h) * x + keep * d
            if prev is not None:
                x = x + 0.5 * keep * (d - prev) * (h / h_prev)
            if eta:
                x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * noise.randn_like(x)
            prev, h_prev = d, h
        x = _finish(x, i, sigmas, after_step, callback, d)
    return x


def dpmpp_3m(denoise, sigmas, x, *, after_step=None, callback=None, progress=False, **_) -> torch.Tensor:
    """DPM-Solver++(3M), deterministic, over the levels `sigmas` (decreasing, last 0)."""
    hist = []  # (prediction, lambda) of the last steps, newest first
    last = len(sigmas) - 2
    for i in _loop(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoise(x, s)
        lam = -math.log(s)
        hist = [(d, lam)] + hist[:2]
        if s_next == 0:
            x = d
        else:
            h = -math.log(s_next) - lam
            phi1 = math.expm1(-h)
            x = (s_next / s) * x - phi1 * d
            order = min(len(hist), 2 if i >= last - 1 else 3)
            if order >= 2:
                r0 = (lam - hist[1][1]) / h
                d1_0 = (d - hist[1][0]) / r0
                phi2 = phi1 / h + 1
                if order == 2:
                    x = x + phi2 * d1_0
                else:
                    r1 = (hist[1][1] - hist[2][1]) / h
                    d1_1 = (hist[1][0] - hist[2][0]) / r1
                    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + phi2 * d1 - (phi2 / h - 0.5) * d2
        x = _finish(x, i, sigmas, after_step, callback, d)
    return x


# A step that divides sigma by more than this is Euler's alone. Heun's trapezoid multiplies the error of the
# denoiser at the step's end by (s_hat - s_next) / (2 s_next): about 3,400 on quad10's first step of a cosine
# chain (sigma 20291 -> 2.9), which turned every sample to noise. Euler's step, x -> D + (s_next / s_hat)(x - D),
# is exact where D is constant over the step, as it is from pure noise. Measured on the shipped digits model
# (unguided, 8 samples): first steps dividing sigma by 127-633 (respacings 250, 100, 50) sample as well as
# karras10; 1,266-1,330 (quad50, 25) drift; 2,607-6,888 (quad25, quad10) give noise. EDM's own schedules
# (karras, logsnr) divide sigma by at most 107 (karras4's last step), so they keep Algorithm 2 unchanged.
HEUN_MAX_RATIO = 1000.0


def edm(denoise, sigmas, x, *, noise, churn: float = EDM_DEFAULTS["churn"], s_noise: float = EDM_DEFAULTS["s_noise"],
        s_tmin: float = EDM_DEFAULTS["s_tmin"], s_tmax: float = EDM_DEFAULTS["s_tmax"], after_step=None, callback=None,
        progress=False, **_) -> torch.Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) over the levels `sigmas`."""
    n = len(sigmas) - 1
    rounding = getattr(denoise, "round", lambda v: v)
    for i in _loop(sigmas, progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = rounding(s * (1 + gamma)) if gamma > 0 else s
        if s_hat > s:  # Algorithm 2 line 5: x_hat = x + sqrt(s_hat^2 - s^2) S_noise z
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * noise.randn_like(x)
        d0 = denoise(x, s_hat)
        slope = (x - d0) / s_hat
        x_next = x + (s_next - s_hat) * slope
        if s_next != 0 and s_hat <= HEUN_MAX_RATIO * s_next:  # line 8: the second-order correction
            d1 = denoise(x_next, s_next)
            x_next = x + (s_next - s_hat) * 0.5 * (slope + (x_next - d1) / s_next)
        x = _finish(x_next, i, sigmas, after_step, callback, d0)
    return x


def over_sigmas(fn):
    """The registry's entry of a sampler written over noise levels in EDM's variables (Karras et al. 2022),
    fn(denoise, sigmas, x, *, noise, after_step, callback, progress, **settings) with x = x_0 + sigma n:
    it gets the guided denoiser (D(x; sigma) = den(x, sigma)) and the chain's levels, x carried from the
    model's variable x_t = x / sqrt(1 + sigma^2) and back, SDEdit's start and mask re-noising included.
    The way to add a sampler from outside the package (docs: Extending guided)."""
    def run(den, x, levels, *, noise, after_step=None, callback=None, progress=False, **settings):
        sig = levels.sigmas if levels.start is None else levels.sigmas[len(levels.sigmas) - 2 - levels.start:]
        after = None
        if after_step is not None:
            after = lambda i, x, s: after_step(i, x / math.sqrt(1 + s**2)) * math.sqrt(1 + s**2)  # noqa: E731
        shown = None if callback is None else lambda i, x, x0: callback((i + 1) / (len(sig) - 1), x0)  # noqa: E731
        return fn(den, sig, x * math.sqrt(1 + sig[0]**2), noise=noise, after_step=after, callback=shown,
                  progress=progress, **settings)
    run.__name__ = run.__qualname__ = f"run_{fn.__name__}"
    run.__doc__ = fn.__doc__
    return run


FUNCTIONS = {"dpm++2m-sde": dpmpp_2m_sde, "dpm++3m": dpmpp_3m, "edm": edm}  # over (D, sigmas, x)
run_dpmpp_2m_sde, run_dpmpp_3m, run_edm = (over_sigmas(f) for f in FUNCTIONS.values())
