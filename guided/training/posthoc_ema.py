"""Post-hoc EMA (Karras et al. 2024, "EDM2", Sec. 3): choose the EMA length after training.

During training, a few power-function EMAs are kept (train.posthoc_ema.sigma_rels) and snapshotted every
train.posthoc_ema.every steps into out_dir/phema/. A power-function EMA with exponent gamma updates, at
step t (1, 2, ...), theta_hat <- beta_t theta_hat + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1),
which averages the weights of steps tau <= t with the profile

    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)  on [0, t]      (discretely: (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1)),

a fixed fraction of the run however long it is. Its width relative to t is
sigma_rel = sqrt(gamma + 1) / ((gamma + 2) sqrt(gamma + 3)) (EDM2 eq. 3; gamma solves a cubic for a given
sigma_rel). Afterwards, the EMA of any other (sigma_rel, step) is a linear combination of the snapshots:
the coefficients x minimise || sum_i x_i p_i - p_target ||^2 in L2 over tau, i.e. solve A x = b with
A_ij = <p_i, p_j> and b_i = <p_i, p_target> (EDM2 App. C), where for profiles (t_a, g_a), (t_b, g_b)

    <p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)),  m = min(t_a, t_b).

`reconstruct(run_dir, sigma_rel)` returns those weights; `export_posthoc` writes them as a weights file
that load_trained, the samplers and the probe read like ema.pt.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from guided.errors import GuidedError
from guided.files import atomic_save, read_file
from guided.networks.checkpoints import export_weights, resolve_trained

SIGMA_REL_MAX = 1 / (2 * math.sqrt(3))  # gamma = 0: the uniform average of the whole run
_SNAPSHOT = re.compile(r"^phema-(\d+)\.pt$")


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma of relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (eq. 3 squared and inverted)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise GuidedError(f"train.posthoc_ema.sigma_rels must lie in (0, {SIGMA_REL_MAX:.4f}), not {sigma_rel}")
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def sigma_rel_of(gamma: float) -> float:
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def profile_dot(t_a, g_a, t_b, g_b):
    """<p_a, p_b>, the L2 inner product of two power-function EMA profiles (broadcasts)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    m = np.minimum(t_a, t_b)
    log = ((g_a + g_b + 1) * np.log(m) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * np.exp(log)


def posthoc_coefficients(steps, gammas, step: float, gamma: float) -> np.ndarray:
    """x minimising || sum_i x_i p_(steps_i, gammas_i) - p_(step, gamma) ||^2 (least squares)."""
    steps, gammas = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    A = profile_dot(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = profile_dot(steps, gammas, step, gamma)
    return np.linalg.lstsq(A, b, rcond=None)[0]


class PowerEMA:
    """Power-function EMAs of a network's parameters, one per sigma_rel (a part of the run state)."""

    def __init__(self, net, sigma_rels):
        self.names = [n for n, _ in net.named_parameters()]
        self.params = [p for p in net.parameters()]
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.averages = [[p.detach().float().clone() for p in self.params] for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, took: torch.Tensor, step: int) -> None:
        """After optimizer step number step + 1 (a 0-dim `took` flag of 0 leaves every average as it was)."""
        src, took, t = [p.detach().float() for p in self.params], took.to(torch.float32), step + 1
        for gamma, avg in zip(self.gammas, self.averages):
            beta = (1 - 1 / t) ** (gamma + 1)
            torch._foreach_lerp_(avg, src, [(1 - beta) * took] * len(avg))

    def state_dict(self) -> dict:
        return {str(s): dict(zip(self.names, avg)) for s, avg in zip(self.sigma_rels, self.averages)}

    def load_state_dict(self, state: dict) -> None:
        for i, s in enumerate(self.sigma_rels):
            if str(s) in state:
                self.averages[i] = [state[str(s)][n].float().to(self.params[0].device).clone() for n in self.names]

    def snapshot(self, out_dir: Path, step: int) -> Path:
        """out_dir/phema/phema-<step>.pt: every average now, with its step and gamma."""

        state = {"step": step, "sigma_rels": self.sigma_rels, "gammas": self.gammas,
                 "averages": {k: {n: v.cpu() for n, v in d.items()} for k, d in self.state_dict().items()}}
        (Path(out_dir) / "phema").mkdir(parents=True, exist_ok=True)
        return atomic_save(state, Path(out_dir) / "phema" / f"phema-{step:07d}.pt")


def snapshots(run_dir) -> list[dict]:
    """The post-hoc EMA snapshots of a run folder, oldest first."""

    folder = Path(run_dir) / "phema"
    found = sorted((int(m.group(1)), p) for p in folder.glob("phema-*.pt") if (m := _SNAPSHOT.match(p.name)))
    return [read_file(p) for _, p in found]


def reconstruct(run_dir, sigma_rel: float, step: int | None = None) -> tuple[dict, np.ndarray]:
    """(parameters of the power-function EMA of width sigma_rel at `step` (the last snapshot's when
    None), the coefficients of the snapshots) from the snapshots up to that step."""
    snaps = [s for s in snapshots(run_dir) if step is None or s["step"] <= step]
    if not snaps:
        raise GuidedError(f"no post-hoc EMA snapshots in {Path(run_dir) / 'phema'} (train.posthoc_ema.sigma_rels)")
    step = snaps[-1]["step"] if step is None else step
    items = [(s["step"], g, s["averages"][str(r)]) for s in snaps for r, g in zip(s["sigma_rels"], s["gammas"])]
    x = posthoc_coefficients([i[0] for i in items], [i[1] for i in items], step, gamma_of(sigma_rel))
    names = items[0][2].keys()
    out = {n: sum(float(c) * i[2][n].double() for c, i in zip(x, items)).float() for n in names}
    return out, x


def export_posthoc(run_dir, sigma_rel: float, out_path, step: int | None = None) -> Path:
    """A weights file of the reconstructed EMA, readable as the run's ema.pt is (load_trained, samplers)."""

    params, _ = reconstruct(run_dir, sigma_rel, step)
    w, cfg, label_map, _ = resolve_trained(run_dir, "model")
    state = {**w["state_dict"], **params}
    export_weights(Path(out_path), state, which=f"phema:{sigma_rel}", kind=w["kind"], cfg=cfg,
                   label_map=label_map, step=int(step or snapshots(run_dir)[-1]["step"]), dtype="fp32")
    return Path(out_path)
