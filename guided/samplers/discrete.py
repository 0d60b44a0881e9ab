"""The paper's samplers on a respaced discrete chain, in its exact arithmetic: ancestral DDPM, DDIM
and DPM-Solver++(2M) with x0 clipped before guidance.

The registry's entries (`run_ddpm`, `run_ddim`, `run_dpmpp_2m`) take the one guided denoiser and the
levels (guided/samplers/registry.py); they run the functions below, which keep the reference's order of
operations over `(diffusion, model_fn, x_T, *, cond_fn=None, noise=None, ...)`: `model_fn(x, t)` is the
network on ORIGINAL timesteps (labels and the mixing guidance terms bound in) and `cond_fn(x, t)` the
sum of the gradient terms. Each step applies cond_fn in the form that suits it: the mean shift for
DDPM (Algorithm 1 of Dhariwal & Nichol; `guidance_form="score"` gives it the score correction
instead), the score correction (guided.guidance.denoiser.correct, Algorithm 2) for DDIM and DPM-Solver++.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from guided.diffusion.gaussian import GaussianDiffusion
from guided.errors import GuidedError
from guided.guidance.denoiser import correct
from guided.samplers.noise import SampleNoise  # noqa: F401  (re-exported: its former home)


def condition_mean(out: dict, grad: torch.Tensor) -> torch.Tensor:
    """Algorithm 1: mu + Sigma * s grad log p(y | x_t)."""
    return out["mean"].float() + out["variance"] * grad.float()


def condition_score(diffusion, out: dict, x: torch.Tensor, t: torch.Tensor, grad: torch.Tensor) -> dict:
    """Algorithm 2 on the chain: eps_hat = correct(eps, grad, sqrt(1 - abar_t)), then x0 and the mean anew.
    eps is recomputed from the (possibly clipped) x0 prediction, as the reference does."""
    abar = diffusion.extract(diffusion.alphas_cumprod, t, x)
    eps = correct(diffusion.eps_from_xstart(x, t, out["pred_xstart"]), grad, (1 - abar).sqrt())
    pred_xstart = diffusion.xstart_from_eps(x, t, eps)
    mean, _, _ = diffusion.q_posterior(pred_xstart, x, t)
    return {**out, "pred_xstart": pred_xstart, "mean": mean}


def _noise_like(noise, x):
    return noise.randn_like(x) if noise is not None else torch.randn_like(x)


def guided_p_mean_variance(diffusion, model_fn, x, i, *, cond_fn=None, clip_denoised=True, form="mean",
                           clip_guided=False, clip_fn=None):
    """The model's p(x_{t-1} | x_t) at respaced index i, with classifier guidance
    as a mean shift (form="mean") or a score correction (form="score").

    `clip_guided` also clips the guided x0 of the score form. The reference does not:
    where abar_t is tiny (the first steps of a cosine schedule, abar_T = 2e-9) the
    correction moves x0 by (1 - abar)/sqrt(abar) * s * grad, thousands of times the
    gradient, and one DDIM step then throws x far out of range. Off by default (the
    paper's arithmetic); --clip-guided turns it on, as the shipped digits models do. `clip_fn` replaces
    the static clip by another (a dynamic threshold: guided.diffusion.space)."""
    t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    clip_fn = clip_fn or (lambda v: v.clamp(-1, 1))
    out = diffusion.p_mean_variance(model_fn(x, diffusion.model_t(t)), x, t, clip_denoised=False,
                                    denoised_fn=clip_fn if clip_denoised else None)
    if cond_fn is not None:
        grad = cond_fn(x, diffusion.model_t(t))
        if form == "mean":
            out = {**out, "mean": condition_mean(out, grad)}
        else:
            out = condition_score(diffusion, out, x, t, grad)
            if clip_guided and clip_denoised:
                x0 = clip_fn(out["pred_xstart"])
                out = {**out, "pred_xstart": x0, "mean": diffusion.q_posterior(x0, x, t)[0]}
    return out, t


def ddpm_step(diffusion, model_fn, x, i, *, cond_fn=None, clip_denoised=True, noise=None, guidance_form="mean",
              clip_guided=False, clip_fn=None, **_):
    """x_{t-1} = mu + sigma z (Ho et al. Algorithm 2), mu shifted by guidance (Algorithm 1), or with
    guidance_form="score" the mean of the score-corrected x0 (Algorithm 2's correction in an ancestral
    step: at low noise the posterior variance Sigma is far below beta_t, so the mean shift under-guides)."""
    if guidance_form not in ("mean", "score"):
        raise GuidedError(f"the DDPM guidance form must be mean or score, not {guidance_form!r}")
    out, _ = guided_p_mean_variance(diffusion, model_fn, x, i, cond_fn=cond_fn, clip_denoised=clip_denoised,
                                    form=guidance_form, clip_guided=clip_guided, clip_fn=clip_fn)
    z = _noise_like(noise, x)
    if i == 0:
        return out["mean"], out
    return out["mean"] + torch.exp(0.5 * out["log_variance"]) * z, out


def ddim_step(diffusion, model_fn, x, i, *, cond_fn=None, clip_denoised=True, noise=None, eta=0.0,
              clip_guided=False, clip_fn=None, eps_from="clipped", **_):
    """DDIM update (Song et al. 2021 eq. 12) with eta-controlled noise, on the
    guidance-corrected eps (Algorithm 2 of Dhariwal & Nichol). `eps_from`: "clipped" re-derives eps from the
    clipped x0 (the paper's code; DDIMScheduler.step's use_clipped_model_output=True), "model" keeps the
    network's guided eps and clips x0 alone (DDIMScheduler.step's default)."""
    if eps_from == "model":
        out, t = guided_p_mean_variance(diffusion, model_fn, x, i, cond_fn=cond_fn, clip_denoised=False, form="score")
        eps = diffusion.eps_from_xstart(x, t, out["pred_xstart"])  # the guided eps itself (x0 not clipped yet)
        if clip_denoised:
            out = {**out, "pred_xstart": (clip_fn or (lambda v: v.clamp(-1, 1)))(out["pred_xstart"])}
    else:
        out, t = guided_p_mean_variance(diffusion, model_fn, x, i, cond_fn=cond_fn, clip_denoised=clip_denoised,
                                        form="score", clip_guided=clip_guided, clip_fn=clip_fn)
        eps = diffusion.eps_from_xstart(x, t, out["pred_xstart"])
    abar = diffusion.extract(diffusion.alphas_cumprod, t, x)
    abar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
    sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
    mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
    z = _noise_like(noise, x)
    if i == 0:
        return mean, out
    return mean + sigma * z, out


def run_loop(step, diffusion: GaussianDiffusion, model_fn, x_T, *, start_index=None, after_step=None,
             progress=False, callback=None, **kw):
    """Apply `step` from respaced index `start_index` (default: the last) down to 0.
    `after_step(i, x)` may replace x after each step (SDEdit's mask re-noising);
    `callback(i, x, pred_xstart)` then sees it and the x0 prediction of the step (read only)."""
    start = diffusion.num_timesteps - 1 if start_index is None else start_index
    x = x_T
    for i in tqdm(range(start, -1, -1), disable=not progress, desc="reverse steps", leave=False):
        with torch.no_grad():
            x, out = step(diffusion, model_fn, x, i, **kw)
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(i, x, out["pred_xstart"])
    return x


def dpmpp_2m(diffusion, model_fn, x_T, *, cond_fn=None, clip_denoised=True, start_index=None, after_step=None,
             progress=False, clip_guided=False, callback=None, clip_fn=None, **_):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), a second-order multistep solver of the
    probability-flow ODE in data prediction, over the respaced steps. Guidance corrects eps
    as in DDIM (Algorithm 2 of Dhariwal & Nichol) before x0 is predicted. With one step it is DDIM."""
    start = diffusion.num_timesteps - 1 if start_index is None else start_index
    x, prev_x0, prev_h = x_T, None, None
    for i in tqdm(range(start, -1, -1), disable=not progress, desc="reverse steps", leave=False):
        with torch.no_grad():
            out, t = guided_p_mean_variance(diffusion, model_fn, x, i, cond_fn=cond_fn,
                                            clip_denoised=clip_denoised, form="score", clip_guided=clip_guided,
                                            clip_fn=clip_fn)
        x0 = out["pred_xstart"]
        if i == 0:  # the last step goes to abar = 1 (sigma = 0): first order, x = x0
            x = x0
        else:
            abar, abar_next = (diffusion.extract(a, t, x) for a in (diffusion.alphas_cumprod,
                                                                    diffusion.alphas_cumprod_prev))
            lam, lam_next = 0.5 * torch.log(abar / (1 - abar)), 0.5 * torch.log(abar_next / (1 - abar_next))
            h = lam_next - lam
            second = prev_x0 is not None and not (i == 1 and start < 15)  # first order last, as DPM-Solver does
            d = x0 + (x0 - prev_x0) * h / (2 * prev_h) if second else x0  # (1 + 1/2r) x0 - 1/2r x0_prev
            sigma_ratio = torch.sqrt((1 - abar_next) / (1 - abar))
            x = sigma_ratio * x - torch.sqrt(abar_next) * torch.expm1(-h) * d
            prev_x0, prev_h = x0, h
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(i, x, x0)
    return x


def ddpm(diffusion, model_fn, x_T, **kw):
    return run_loop(ddpm_step, diffusion, model_fn, x_T, **kw)


def ddim(diffusion, model_fn, x_T, **kw):
    return run_loop(ddim_step, diffusion, model_fn, x_T, **kw)



# -- the registry's entries: the guided denoiser and the levels ---------------------------------------
def _chain_keywords(den, levels, noise, after_step, callback, progress) -> dict:
    n = (levels.chain.num_timesteps if levels.start is None else levels.start + 1)
    return dict(noise=noise, cond_fn=den.grad, clip_denoised=den.clips, clip_guided=den.clip_guided,
                clip_fn=den.clip_x0, start_index=levels.start, after_step=after_step, progress=progress,
                callback=None if callback is None else lambda i, x_i, x0: callback((n - i) / n, x0))


def run_ddpm(den, x, levels, *, noise, after_step=None, callback=None, progress=False, ddpm_form="mean"):
    kw = _chain_keywords(den, levels, noise, after_step, callback, progress)
    return ddpm(levels.chain, den.output, x, guidance_form=ddpm_form, **kw)


def run_ddim(den, x, levels, *, noise, after_step=None, callback=None, progress=False, eta=0.0, eps="clipped"):
    kw = _chain_keywords(den, levels, noise, after_step, callback, progress)
    return ddim(levels.chain, den.output, x, eta=eta, eps_from=eps, **kw)


def run_dpmpp_2m(den, x, levels, *, noise, after_step=None, callback=None, progress=False):
    kw = _chain_keywords(den, levels, noise, after_step, callback, progress)
    return dpmpp_2m(levels.chain, den.output, x, **kw)
