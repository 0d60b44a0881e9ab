"""Few-step samplers made for guidance, on the noise level sigma of an eps model's discrete VP chain.

Each is a plain function `sampler(denoise, sigmas, x, *, noise, ...) -> x_0` over a `Denoiser`
and a decreasing list of noise levels ending in 0, in the variables of Karras et al. 2022 (EDM):
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
sampling in data prediction): the Job's `model_fn` (mixing terms bound in: cfg, autoguidance)
gives eps, the gradient terms correct it as in Dhariwal & Nichol Algorithm 2,
eps_hat = eps - sqrt(1 - abar_t) cond_fn(x_vp, t), and D = x - sigma eps_hat is then thresholded in
pixel space: "dynamic" (default; Saharia et al. 2022 sec. 2.3, as DPM-Solver++ does for pixel-space
guided models: s = max(1, the `percentile` quantile of |D| per sample), D = clip(D, -s, s) / s),
"static" (clip to [-1, 1]) or "none" (also what --no-clip gives). In EDM's sampler the same guided
D enters dx/dsigma = (x - D) / sigma, i.e. the guided score (D - x) / sigma^2 = score + cond_fn * alpha.

Settings (`Job.extra`, the --sampler-arg KEY=VALUE of the command line): threshold, percentile;
eta (dpm++2m-sde); churn, s_noise, s_tmin, s_tmax (edm; defaults: EDM Table 5's ImageNet-64 ADM
settings, S_churn 80, S_tmin 0.05, S_tmax 50, S_noise 1.003). Noise is drawn with the Job's
per-sample generators, so a seed gives the same image at any batch size.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from guided.errors import GuidedError

THRESHOLDS = ("dynamic", "static", "none")
EDM_DEFAULTS = dict(churn=80.0, s_noise=1.003, s_tmin=0.05, s_tmax=50.0)  # EDM Table 5, ImageNet-64
SETTINGS = {"threshold": str, "percentile": float, "eta": float, **{k: float for k in EDM_DEFAULTS}}


def threshold(x0: torch.Tensor, kind: str = "dynamic", percentile: float = 0.995) -> torch.Tensor:
    """Pixel-space thresholding of a data prediction (Saharia et al. 2022 sec. 2.3)."""
    if kind == "none":
        return x0
    if kind == "static":
        return x0.clamp(-1, 1)
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=1).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class Denoiser:
    """The guided data prediction D(x; sigma) of an eps network on a discrete VP chain.

    `model_fn(x_vp, t_net)` and `cond_fn(x_vp, t_net)` are the guidance layer's two callables;
    `alphas_cumprod` the whole chain's, `model_t` maps original timesteps to network time. Levels
    are rounded to the chain's timesteps (`round`); `calls` counts the network evaluations."""

    def __init__(self, model_fn, alphas_cumprod, *, cond_fn=None, model_t=None, clip: str = "dynamic",
                 percentile: float = 0.995, preview: Optional[Callable] = None):
        if clip not in THRESHOLDS:
            raise GuidedError(f"threshold must be one of {', '.join(THRESHOLDS)}, not {clip!r}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.log_sigmas = 0.5 * torch.log((1 - abar) / abar)
        self.model_fn, self.cond_fn, self.clip, self.percentile = model_fn, cond_fn, clip, percentile
        self.model_t = model_t or (lambda t: t)
        self.preview, self.calls = preview, 0

    def timestep(self, sigma: float) -> int:
        """The original timestep of nearest log sigma."""
        return int((self.log_sigmas - math.log(sigma)).abs().argmin())

    def round(self, sigma: float) -> float:
        """EDM's round_sigma: the chain's level nearest sigma."""
        return math.exp(float(self.log_sigmas[self.timestep(sigma)]))

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = self.timestep(sigma)
        sigma = math.exp(float(self.log_sigmas[t]))
        alpha = 1 / math.sqrt(1 + sigma**2)  # sqrt(abar_t)
        x_vp = x * alpha
        t_net = self.model_t(torch.full((len(x),), t, device=x.device, dtype=torch.long))
        eps = self.model_fn(x_vp, t_net)[:, :x.shape[1]].to(x.dtype)
        if self.cond_fn is not None:  # Dhariwal & Nichol Algorithm 2: eps - sqrt(1 - abar) * s grad
            eps = eps - sigma * alpha * self.cond_fn(x_vp, t_net).to(x.dtype)
        self.calls += 1
        x0 = threshold(x - sigma * eps, self.clip, self.percentile)
        if self.preview is not None:
            self.preview(x0)
        return x0


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


FUNCTIONS = {"dpm++2m-sde": dpmpp_2m_sde, "dpm++3m": dpmpp_3m, "edm": edm}


def settings(extra: dict) -> dict:
    """The sampler settings of Job.extra, typed; unknown keys refused in one line."""
    unknown = sorted(set(extra) - set(SETTINGS))
    if unknown:
        raise GuidedError(f"unknown sampler setting {unknown[0]!r}; the few-step samplers take {', '.join(SETTINGS)}")
    try:
        typed = {k: SETTINGS[k](v) for k, v in extra.items()}
    except ValueError:
        typed = {"threshold": None}
    if typed.get("threshold", "dynamic") not in THRESHOLDS or not all(
            math.isfinite(v) for k, v in typed.items() if k != "threshold"):
        raise GuidedError(f"sampler settings are finite numbers and threshold one of {', '.join(THRESHOLDS)}: {extra}")
    return typed


def runner(name: str):
    """The registry's run(job) of the few-step sampler `name` on the job's respaced chain."""
    fn = FUNCTIONS[name]

    def run(job) -> torch.Tensor:
        kw = settings(job.extra)
        kind = kw.pop("threshold", "dynamic") if job.clip_denoised else "none"
        chain, base = job.model.process(str(job.steps)), job.model.base
        ts = chain.timestep_map.flip(0).tolist()  # original timesteps, noisiest first
        sig = [math.sqrt((1 - float(base.alphas_cumprod[t])) / float(base.alphas_cumprod[t])) for t in ts] + [0.0]
        n_evals = len(ts) * (2 if name == "edm" else 1)
        done = [0]

        def show(x0):
            done[0] += 1
            job.preview(min(1.0, done[0] / n_evals), x0)
        denoise = Denoiser(job.model_fn, base.alphas_cumprod, cond_fn=job.cond_fn, model_t=base.model_t, clip=kind,
                           percentile=kw.pop("percentile", 0.995), preview=show if job.preview else None)
        x = job.model.prior(job.noise, job.shape) if job.x_T is None else job.x_T.to(job.noise.device)
        after = None
        if job.sdedit is not None:
            x, start, after_vp = job.sdedit.discrete_start(chain, x, job.noise)
            sig = sig[len(ts) - 1 - start:]
            if after_vp is not None:
                after = lambda i, x, s: after_vp(i, x / math.sqrt(1 + s**2)) * math.sqrt(1 + s**2)  # noqa: E731
        out = fn(denoise, sig, x * math.sqrt(1 + sig[0]**2), noise=job.noise, after_step=after,
                 progress=job.progress, **kw)
        return out.float()
    return run
