"""Calibrating a noise-aware classifier: one softmax temperature per band of noise levels.

A classifier's confidence decides how hard guidance pushes (the gradient of log p(y | x_t)
grows as the logits sharpen), so an over-confident classifier at high noise over-steers.
Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks", sec. 4.2)
divides the logits by T fitted to minimise the held-out negative log-likelihood; here one T
per band of timesteps, since calibration changes with the noise level (Ma et al. 2023,
"Elucidating the design space of classifier-guided diffusion generation", sec. 3.2).
The expected calibration error (Guo et al. eq. 3, 15 equal-width confidence bins) is
reported before and after.

`Calibration` travels with the classifier's weights (the "calibration" entry of a weights
file, see guided/networks/checkpoints.py) and guidance divides the logits by `temperature(t)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from guided.errors import GuidedError

MIN_ERRORS = 10  # misclassified fitting examples a band needs for its temperature to be fitted


@dataclass
class Calibration:
    edges: torch.Tensor  # [K + 1] increasing band edges in the classifier's timesteps; band k = [edges[k], edges[k+1])
    temperature: torch.Tensor  # [K]

    def __post_init__(self):
        self.edges = torch.as_tensor(self.edges, dtype=torch.float64)
        self.temperature = torch.as_tensor(self.temperature, dtype=torch.float32)
        if self.edges.dim() != 1 or len(self.edges) != len(self.temperature) + 1 or not len(self.temperature):
            raise GuidedError("a calibration needs K temperatures and K + 1 band edges")
        if not bool(torch.all(self.temperature > 0)) or not bool(torch.all(torch.isfinite(self.temperature))):
            raise GuidedError("calibration temperatures must be finite and positive")

    def temperature_at(self, t: torch.Tensor) -> torch.Tensor:
        """T of each timestep in t (a float or integer tensor [N]); outside the edges, the nearest band."""
        inner = self.edges[1:-1].to(t.device, torch.float32)  # whole timesteps: exact in float32, on t's device
        k = torch.bucketize(t.detach().float(), inner, right=True)  # no host round trip inside the sampling loop
        return self.temperature.to(t.device)[k]

    def to_dict(self) -> dict:
        return {"edges": self.edges.clone(), "temperature": self.temperature.clone()}

    @classmethod
    def from_dict(cls, d) -> "Calibration | None":
        return None if not d else cls(d["edges"], d["temperature"])


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE = sum_b |B_b|/n |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. eq. 3)."""
    probs = logits.float().softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == labels).float()
    b = (conf * bins).long().clamp(max=bins - 1)
    gap = torch.zeros(bins).index_add_(0, b, correct - conf)
    return float(gap.abs().sum() / len(labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """argmin_T NLL(softmax(logits / T), labels), by Newton steps on log T from T = 1 (a 1-D convex-enough
    problem; clamped to [0.05, 20])."""
    z, y = logits.double().detach(), labels
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        return _newton_log_t(z, y, log_t)


def _newton_log_t(z, y, log_t) -> float:
    for _ in range(50):
        nll = F.cross_entropy(z / log_t.exp(), y)
        (g,) = torch.autograd.grad(nll, log_t, create_graph=True)
        (h,) = torch.autograd.grad(g, log_t)
        step = g / h if h > 1e-12 else g.sign() * 0.5
        with torch.no_grad():
            log_t -= step.clamp(-1, 1)
            log_t.clamp_(-3.0, 3.0)
        if abs(float(step.detach())) < 1e-8:
            break
    return float(log_t.detach().exp())


def calibrate(logits: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, edges, holdout_every: int = 2) -> tuple:
    """(Calibration, report) from held-out logits at timesteps t: a temperature per band [edges[k], edges[k+1]),
    fitted on all but every `holdout_every`-th example; the report gives each band's accuracy and ECE
    before and after on those left out."""
    edges = torch.as_tensor(edges, dtype=torch.float64)
    band = torch.bucketize(t.double(), edges[1:-1], right=True)
    test = torch.arange(len(labels)) % holdout_every == 0
    temps, report = [], []
    for k in range(len(edges) - 1):
        fit, ev = (band == k) & ~test, (band == k) & test
        if fit.sum() < 2 or ev.sum() < 1:
            raise GuidedError(f"calibration band {k} has too few held-out examples ({int((band == k).sum())})")
        errors = int((logits[fit].argmax(-1) != labels[fit]).sum())
        # with (almost) no errors the likelihood keeps rising as T -> 0: no temperature to fit, keep 1
        temp = fit_temperature(logits[fit], labels[fit]) if errors >= MIN_ERRORS else 1.0
        temps.append(temp)
        report.append(dict(band=k, t_from=float(edges[k]), t_to=float(edges[k + 1]), temperature=temp, errors=errors,
                           accuracy=float((logits[ev].argmax(-1) == labels[ev]).float().mean()),
                           ece_before=expected_calibration_error(logits[ev], labels[ev]),
                           ece_after=expected_calibration_error(logits[ev] / temp, labels[ev]), n=int(ev.sum())))
    return Calibration(edges, torch.tensor(temps)), report
