"""Is a run done, is it diverging: rules over logged curves, and the classifier's accuracy-against-t figure.

Done (the classifier, train.eval.done_margin / done_window): after evaluation i, a run is done when no band
of t has raised its best held-out top-1 by more than its margin over the last `window` evaluations:
max(acc_b[i-window+1 .. i]) - max(acc_b[0 .. i-window]) <= m_b for every band b, where
m_b = max(margin, sqrt(p_b (1 - p_b) / n)) with p_b the earlier best and n the images scored per band:
a gain under the binomial standard error of the band's accuracy is not evidence of progress. It is
said once, printed and written to metrics.jsonl (`done_step`).

Diverging: the training loss's mean over the last `window` log intervals exceeds the mean of the
`window` before by more than `loss_rise` (relative), or is not finite; or held-out top-1 has fallen
more than `acc_drop` below its best at `window` evaluations in a row. One line when it starts; said again
only after the run has recovered.
"""
from __future__ import annotations

import math

import torch

from guided.guidance.calibration import expected_calibration_error


def done_index(history: list[list[float]], margin: float, window: int, n: int = 0) -> int | None:
    """The first evaluation i at which every band's best rose by at most its margin over the last `window`
    evaluations (history[i][b] = top-1 of band b at evaluation i; the margin is `margin`, or the binomial
    standard error of n images at the earlier best when larger and n > 0); None if never."""
    if window < 1:
        return None
    for i in range(window, len(history)):
        before = [max(h[b] for h in history[:i - window + 1]) for b in range(len(history[i]))]
        recent = [max(h[b] for h in history[i - window + 1:i + 1]) for b in range(len(history[i]))]
        margins = [max(margin, math.sqrt(p * (1 - p) / n)) if n else margin for p in before]
        if all(r - p <= m for r, p, m in zip(recent, before, margins)):
            return i
    return None


def loss_diverging(losses: list[float], window: int = 5, loss_rise: float = 0.2) -> bool:
    """The last `window` logged losses average more than (1 + loss_rise) times the `window` before, or are not finite."""
    if losses and not math.isfinite(losses[-1]):
        return True
    if len(losses) < 2 * window:
        return False
    recent, before = sum(losses[-window:]) / window, sum(losses[-2 * window:-window]) / window
    return recent > (1 + loss_rise) * before


def accuracy_diverging(accs: list[float], window: int = 2, acc_drop: float = 0.05) -> bool:
    """Held-out top-1 below its best by more than acc_drop at the last `window` evaluations."""
    if len(accs) <= window:
        return False
    best = max(accs[:-window])
    return all(a < best - acc_drop for a in accs[-window:])


class Progress:
    """The curves a run's signals read, kept in the run state (so a resumed run keeps its history and
    says "done" once): logged training losses, and per evaluation its step and top-1 / ECE per band."""

    def __init__(self):
        self.losses, self.steps, self.acc, self.ece = [], [], [], []
        self.done_step, self.warned = None, {"loss": False, "accuracy": False}

    def state_dict(self) -> dict:
        return dict(losses=self.losses, steps=self.steps, acc=self.acc, ece=self.ece, done_step=self.done_step,
                    warned=dict(self.warned))

    def load_state_dict(self, d: dict) -> None:
        self.losses, self.steps, self.acc, self.ece = d["losses"], d["steps"], d["acc"], d["ece"]
        self.done_step, self.warned = d["done_step"], dict(d["warned"])

    def warn(self, what: str, now: bool, line: str, say) -> None:
        """Say `line` when `what` starts going the wrong way (once until it recovers)."""
        if now and not self.warned[what]:
            say(line)
        self.warned[what] = now

    def see_loss(self, step: int, loss: float, say) -> None:
        self.losses.append(float(loss))
        self.warn("loss", loss_diverging(self.losses), f"warning: step {step}: training loss {loss:.4g} is rising "
                  f"(mean of the last 5 logs over 1.2x the 5 before, or not finite): check train.lr", say)

    def see_eval(self, step: int, acc: list[float], ece: list[float], overall: float, margin: float,
                 window: int, say, n: int = 0) -> dict:
        """Record an evaluation; returns the metrics to log once the run is first seen done."""
        self.steps.append(step)
        self.acc.append([float(a) for a in acc])
        self.ece.append([float(e) for e in ece])
        overall_curve = [sum(a) / len(a) for a in self.acc]
        self.warn("accuracy", accuracy_diverging(overall_curve), f"warning: step {step}: held-out top-1 "
                  f"{overall:.1%} fell over 5 points below its best at 2 evaluations in a row: diverging", say)
        if self.done_step is not None:
            return {}
        i = done_index(self.acc, margin, window, n)
        if i is None:
            return {}
        self.done_step = self.steps[i]
        say(f"done: at step {self.done_step} no band of t raised its held-out top-1 by more than "
            f"{margin:.1%} (or the standard error of {n} images) over the last {window} evaluations "
            f"(train.eval.done_margin, done_window)")
        return {"done_step": self.done_step, "done_margin": margin, "done_window": window, "done_images": n}


def plot_bands(progress: Progress, edges: list[float], path, title: str = "") -> None:
    """One PNG: held-out top-1 and ECE against t (band centres), one line per evaluation, darker = later."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    cmap = plt.get_cmap("viridis")
    for k, (step, acc, ece) in enumerate(zip(progress.steps, progress.acc, progress.ece)):
        colour = cmap(k / max(1, len(progress.steps) - 1))
        ax.plot(centres, acc, marker="o", ms=3, color=colour, label=f"step {step}")
        bx.plot(centres, ece, marker="o", ms=3, color=colour)
    ax.set(xlabel="timestep t (noise grows to the right)", ylabel="held-out top-1", ylim=(0, 1.02), title=title)
    bx.set(xlabel="timestep t", ylabel="expected calibration error (15 bins)", title="calibration (before fitting)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def band_ece(logits: torch.Tensor, labels: torch.Tensor) -> float:

    return expected_calibration_error(logits, labels) if len(labels) else float("nan")
