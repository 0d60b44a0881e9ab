"""Guidance: composable terms wrapped around a model function, never built into a network or a sampler.

The guided denoiser every sampler receives (guided/guidance/denoiser.py) holds guidance as two
callables: `model_fn(x, t)`, the network output with the MIXING terms applied to its eps, and
`cond_fn(x, t)`, the sum of the GRADIENT terms, s * grad_x log p(y | x_t) in total. t is always
the timestep the networks see (original diffusion steps, or an NCSN ladder index). The denoiser
turns cond_fn into an eps correction, eps - sqrt(1 - abar_t) * cond_fn (Dhariwal & Nichol
Algorithm 2), or, DDPM by default, into the paper's mean shift mu + Sigma * cond_fn (Algorithm 1).

The kinds of term (`KINDS`, a registry: `register_term` adds one from outside the package):
  classifier     noise-aware classifier p(y | x_t, t), the gradient taken at x_t with the original t
                 (Dhariwal & Nichol 2021 sec. 4); logits divided by the classifier's fitted
                 temperature per noise band when it has one (guided/guidance/calibration.py) and
                 `calibrated`;
  x0_classifier  a classifier of CLEAN images on the denoised estimate x0_hat(x_t), its gradient taken
                 through the denoiser to x_t, logits / temperature (Ma et al. 2023, "Elucidating the
                 design space of classifier-guided diffusion generation");
  cfg            classifier-free: eps_c + (w - 1)(eps_c - eps_null), one network trained with label
                 dropout (Ho & Salimans 2022 eq. 6; w = 1 is the conditional model, w = 0 the null class);
  autoguide      eps_main + (w - 1)(eps_main - eps_weak), a weaker model with the same conditioning
                 (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself", eq. 2).
Composition is a sum of corrections around the conditional prediction: the mixing terms add their
(w - 1)(eps_main - eps_other) to eps, then the gradient terms add theirs. Each term is weighted by
its schedule over the noise level sigma and is active only for sigma in its interval (Kynkaanniemi
et al. 2024, "Applying guidance in a limited interval improves sample and distribution quality";
sigma = sqrt((1 - abar) / abar) for VP models, the ladder's sigma for NCSN). Outside its interval a
term costs no network evaluation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from guided.errors import GuidedError

CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TermKind:
    """A kind of guidance term. A MIXING term pushes the prediction away from another one:
    eps + (w - 1)(eps - other), `other(term, x, t, y_net)` the other network output (w = 1: off). A
    GRADIENT term adds s * grad_x log p(y | x_t): `grad(term, x, t, y, denoise)` gives the gradient
    (s = 0: off); `denoise(x, t)` is the model's x0 estimate. `load(spec)` builds its network from a
    path given on the command line (--guide-network NAME=PATH)."""
    name: str
    mode: str  # "mixing" | "gradient"
    fn: Optional[Callable] = None  # other(...) of a mixing term, grad(...) of a gradient one
    needs_network: bool = True
    load: Optional[Callable[[str], Any]] = None

    @property
    def off(self) -> float:
        return 1.0 if self.mode == "mixing" else 0.0


KINDS: dict[str, TermKind] = {}


def register_term(kind: TermKind) -> TermKind:
    """Add a kind of guidance term (by its name; a name already taken is refused)."""
    if kind.name in KINDS:
        raise GuidedError(f"a guidance term named {kind.name!r} is already registered")
    if kind.mode not in ("mixing", "gradient"):
        raise GuidedError(f"guidance term {kind.name}: mode must be mixing or gradient, not {kind.mode!r}")
    KINDS[kind.name] = kind
    return kind


def _kinds(mode: str) -> tuple:
    return tuple(k for k, v in KINDS.items() if v.mode == mode)

# Weights over sigma; each is 1 where sigma is mid-range in the VP sense (abar = 1/2 at sigma = 1).
SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "constant": torch.ones_like,
    "noisy": lambda s: s**2 / (1 + s**2),  # = 1 - abar on a VP model: strongest far from the data
    "clean": lambda s: 1 / (1 + s**2),  # = abar: strongest near the data
}


def classifier_grad(classifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                    temperature: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad_x sum_i log softmax(classifier(x, t) / T)_i[y_i], in the dtype of x."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t).float()
        if temperature is not None:
            logits = logits / temperature.view(-1, 1)
        selected = F.log_softmax(logits, dim=-1)[torch.arange(len(y), device=y.device), y]
        return torch.autograd.grad(selected.sum(), x_in)[0]


def x0_classifier_grad(classify, denoise, x, t, y, temperature: float = 1.0) -> torch.Tensor:
    """grad_x log softmax(classify(x0_hat(x, t)) / T)[y], through the denoiser (one backward pass of it)."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classify(denoise(x_in, t)).float() / temperature
        selected = F.log_softmax(logits, dim=-1)[torch.arange(len(y), device=y.device), y]
        return torch.autograd.grad(selected.sum(), x_in)[0]


def _classifier_term(term, x, t, y, denoise):
    if term.labels is not None:  # the model's class indices in the classifier's own label map
        y = term.labels.to(y.device)[y]
    cal = getattr(term.network, "calibration", None) if term.calibrated else None
    return classifier_grad(term.network, x, t, y, None if cal is None else cal.temperature_at(t))


def _x0_classifier_term(term, x, t, y, denoise):
    if denoise is None:
        raise GuidedError("x0-classifier guidance needs a denoiser (an eps-prediction model)")
    return x0_classifier_grad(term.network, denoise, x, t, y, term.temperature)


def _autoguide_term(term, x, t, y_net):
    return term.network(x, t) if y_net is None else term.network(x, t, y=y_net)


for _k in (TermKind("classifier", "gradient", _classifier_term), TermKind("x0_classifier", "gradient", _x0_classifier_term),
           TermKind("cfg", "mixing", None, needs_network=False), TermKind("autoguide", "mixing", _autoguide_term)):
    register_term(_k)


def classifier_cond_fn(classifier, y: torch.Tensor, scale: float) -> CondFn:
    """cond_fn(x, t) = scale * grad_x log p(y | x, t): the paper's form, one always-active term."""
    def cond_fn(x, t):
        return scale * classifier_grad(classifier, x, t, y)
    return cond_fn


def check_interval(lo, hi) -> tuple:
    """(lo, hi) of a term's active range of noise levels sigma: 0 <= lo <= hi (hi may be inf); the one rule."""
    lo, hi = float(lo), float(hi)
    if not (0 <= lo <= hi) or math.isnan(hi):
        raise GuidedError(f"a guidance interval is sigma_lo,sigma_hi with 0 <= lo <= hi, not {lo:g},{hi:g}")
    return lo, hi


# -- terms ----------------------------------------------------------------------------------------
@dataclass
class Term:
    kind: str  # a name in KINDS: classifier | x0_classifier | cfg | autoguide, or a registered one
    scale: float  # s for gradient terms (0 = off), w for mixing terms (1 = off)
    network: Any = None  # classifier(x, t); classify(x0) -> logits; the weak model(x, t, y=...)
    interval: Optional[tuple] = None  # (sigma_lo, sigma_hi): active there only; None = every level
    schedule: str = "constant"
    temperature: float = 1.0  # x0_classifier: logits / temperature
    calibrated: bool = True  # classifier: use its fitted temperatures when it has them
    labels: Any = None  # classifier: LongTensor, the model's class index -> the classifier's (other label maps)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GuidedError(f"unknown guidance term {self.kind!r}; one of {', '.join(KINDS)}")
        if self.schedule not in SCHEDULES:
            raise GuidedError(f"unknown guidance schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        if not math.isfinite(self.scale):
            raise GuidedError(f"the {self.kind} guidance scale must be a finite number, not {self.scale}")
        if self.interval is not None:
            self.interval = check_interval(*self.interval)
        if not self.temperature > 0:
            raise GuidedError(f"the x0-classifier temperature must be positive, not {self.temperature}")
        if self.network is None and KINDS[self.kind].needs_network and not self.neutral:
            raise GuidedError(f"{self.kind} guidance needs its network")

    @property
    def neutral(self) -> bool:
        return self.scale == KINDS[self.kind].off

    @property
    def plain(self) -> bool:
        """Active at every level with a constant weight: the paper's form."""
        return self.interval is None and self.schedule == "constant"

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """[N] float: the schedule at each sigma, 0 outside the interval."""
        w = SCHEDULES[self.schedule](sigma.float())
        if self.interval is not None:
            w = w * ((sigma >= self.interval[0]) & (sigma <= self.interval[1]))
        return w


class Guidance:
    """Terms over one model, bound to the labels by `model_fn` and `cond_fn`.

    sigma_of(t): the noise level of the timesteps the networks see (ScoreModel.sigma_of).
    null_label: the class index of a label-dropout model's unconditional score (for cfg).
    """

    def __init__(self, terms, sigma_of, null_label: Optional[int] = None):
        self.terms = [t for t in terms if not t.neutral]
        self.sigma_of = sigma_of
        self.null_label = null_label
        if any(t.kind == "cfg" for t in self.terms) and null_label is None:
            raise GuidedError("classifier-free guidance needs a model trained with label dropout (model.null_class)")

    def of(self, kinds):
        return [t for t in self.terms if t.kind in kinds]

    def model_fn(self, model, y_net: Optional[torch.Tensor]):
        """The network on the timesteps it sees, labels bound in, the mixing terms applied to its eps
        (learned-variance channels come from the plain pass)."""
        call = (lambda net, x, t, y: net(x, t)) if y_net is None else (lambda net, x, t, y: net(x, t, y=y))
        mixing = self.of(_kinds("mixing"))
        if not mixing:
            return lambda x, t: call(model, x, t, y_net)

        def guided(x, t):
            cfg = next((m for m in mixing if m.kind == "cfg"), None)
            if cfg is not None and self._active(cfg, t):  # one batched pass for both labels
                both = model(torch.cat([x, x]), torch.cat([t, t]),
                             y=torch.cat([y_net, torch.full_like(y_net, self.null_label)]))
                out, null = both.chunk(2)
            else:
                out, null = call(model, x, t, y_net), None
            c = x.shape[1]
            eps, sigma = out[:, :c], self.sigma_of(t)
            for term in mixing:
                if null is None if term.kind == "cfg" else not self._active(term, t):  # cfg's was read above
                    continue
                other = null if term.kind == "cfg" else KINDS[term.kind].fn(term, x, t, y_net)
                w = (term.scale - 1) if term.plain else (term.scale - 1) * _per_sample(term.weight(sigma), x)
                eps = eps + w * (out[:, :c] - other[:, :c])
            return torch.cat([eps, out[:, c:]], dim=1)
        return guided

    def cond_fn(self, y: torch.Tensor, denoise=None) -> Optional[CondFn]:
        """sum over gradient terms of weight(sigma_t) * s * grad_x log p(y | .), or None without them.
        `denoise(x, t)` (x0_hat, see ScoreModel.denoiser) is needed by x0_classifier terms."""
        grads = self.of(_kinds("gradient"))
        if not grads:
            return None

        def cond_fn(x, t):
            total = torch.zeros_like(x)
            for term in grads:
                if not self._active(term, t):
                    continue
                g = KINDS[term.kind].fn(term, x, t, y, denoise)
                total = total + (term.scale * g if term.plain else
                                 term.scale * _per_sample(term.weight(self.sigma_of(t)), x) * g)
            return total
        return cond_fn

    def _active(self, term: Term, t) -> bool:
        """False when no sample of the batch is inside the term's interval (a host read, only for
        terms that have an interval), so its network is not evaluated there."""
        return term.interval is None or bool(term.weight(self.sigma_of(t)).any())


def _per_sample(w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return w.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)
