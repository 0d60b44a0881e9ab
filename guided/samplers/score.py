"""The score interface every score-based sampler uses, and its adapters.

A score function is a plain callable

    score_fn(x, t) -> grad_x log p_t(x)

with x a batch [N, ...] and t a float tensor [N] of continuous SDE time
(see guided/sde.py). Networks are turned into score functions here; guidance
wraps a score function into another one and is never built into a sampler.
Each adapter is defined once, in this file.
"""

import torch

from guided.errors import GuidedError
from guided.guidance.terms import classifier_grad
from guided.diffusion.sde import VESDE, expand_as


def score_from_eps(eps_fn, sde):
    """s(x, t) = -eps(x, t) / sigma_t: a noise predictor is a scaled score
    (x_t = alpha_t x_0 + sigma_t eps gives grad log p_0t = -eps / sigma_t;
    Song et al. 2021 App. B; Lu et al. 2022 Sec. 2)."""

    def score_fn(x, t):
        _, sigma = sde.marginal(t)
        return -eps_fn(x, t) / expand_as(sigma, x)

    return score_fn


def eps_model_score(model, sde, y=None, model_kwargs=None):
    """Score of an ADM epsilon network `model(x, timesteps, y=None) -> out`.

    The network sees `sde.model_time(t)` (for a `DiscreteVPSDE` the fractional
    discrete timestep (t - 1/N) N). Its first C output channels are eps; a
    learned-sigma model outputs 2C channels and the second half is dropped.
    `y` (class labels) is passed only when given.
    """
    kwargs = dict(model_kwargs or {})
    if y is not None:
        kwargs["y"] = y

    def eps_fn(x, t):
        out = model(x, sde.model_time(t), **kwargs)
        c = x.shape[1]
        if out.shape[1] not in (c, 2 * c) or out.shape[2:] != x.shape[2:]:
            raise GuidedError(
                f"eps model returned shape {tuple(out.shape)} for input {tuple(x.shape)}: "
                f"expected {c} (eps) or {2 * c} (eps + learned sigma) channels")
        return out[:, :c]

    return score_from_eps(eps_fn, sde)


class LadderTime:
    """Continuous VE time -> the index of the nearest rung (in log sigma) of a decreasing NCSN
    ladder, through sigma(t) = sigma_min (sigma_max/sigma_min)^t: the `model_time` of networks
    conditioned on the ladder index (the NCSN score model and its classifier)."""

    def __init__(self, sigmas):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.dim() != 1 or sigmas.numel() < 2 or not torch.all(sigmas[1:] < sigmas[:-1]):
            raise GuidedError("sigmas must be a decreasing 1-D ladder with >= 2 levels")
        self.ve = VESDE(float(sigmas[-1]), float(sigmas[0]))
        self.log_ladder = sigmas.log()

    def model_time(self, t):
        log_sigma = self.ve.sigma(t.double()).log().to("cpu")
        return (log_sigma[:, None] - self.log_ladder[None, :]).abs().argmin(dim=1).to(t.device)


def ncsn_score(model, sigmas):
    """Score of an NCSN `model(x, labels) -> s(x, sigma_labels)` (Song & Ermon 2019),
    conditioned on the index of its noise level in the decreasing ladder `sigmas`
    (see LadderTime). Sample it with a `VESDE(sigmas[-1], sigmas[0])`."""
    ladder = LadderTime(sigmas)

    def score_fn(x, t):
        return model(x, ladder.model_time(t))

    return score_fn


def classifier_grad_fn(classifier, sde, y, grad=classifier_grad):
    """grad_log_prob_fn(x, t) = grad_x log p(y | x_t) of a noise-aware classifier.

    Converts t to the classifier's timestep with `sde.model_time` and calls
    `grad(classifier, x, t_model, y)` (by default the project's one
    `guided.guidance.terms.classifier_grad`).
    """
    y = torch.as_tensor(y)

    def grad_log_prob_fn(x, t):
        return grad(classifier, x, sde.model_time(t), y.to(x.device))

    return grad_log_prob_fn


def guided_score(score_fn, grad_log_prob_fn, scale):
    """Classifier guidance: s(x, t) + scale * grad_x log p(y | x_t).

    Dhariwal & Nichol 2021 Sec. 4 / Song et al. 2021 eq. 14: with scale 1 this
    is the score of p_t(x | y); scale s samples ~ p(x) p(y | x)^s (exactly only
    at s in {0, 1}: for other scales the tilted marginals are not those of one
    diffusion).
    """

    def guided_fn(x, t):
        s = score_fn(x, t)
        if scale == 0:
            return s
        return s + scale * grad_log_prob_fn(x, t)

    return guided_fn


def cfg_score(cond_score_fn, uncond_score_fn, scale):
    """Classifier-free guidance (Ho & Salimans 2022 eq. 6, in score form):
    s_u + scale (s_c - s_u). scale 1 is the conditional score; Ho & Salimans'
    w corresponds to scale = 1 + w. Compose with classifier guidance as
    `guided_score(cfg_score(c, u, w), classifier_grad_fn(...), s)`.
    """

    def cfg_fn(x, t):
        s_u = uncond_score_fn(x, t)
        return s_u + scale * (cond_score_fn(x, t) - s_u)

    return cfg_fn
