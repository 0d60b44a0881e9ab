"""Small pieces of the training loops: seeds, per-quarter loss meters, tracker hyper-parameters."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import OmegaConf


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, purpose): independent streams per process and use."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class QuarterMeter:
    """Per-example values summed per quarter (or per one of `bins` equal bands, named name_<tag><i>)
    of the original timestep range, on the device.

    Nothing leaves the device until `flush`, which reduces over processes and returns
    {name: mean, name_q0..name_q3: means per quarter} (the reference's log_loss_dict).
    Values without timesteps (t=None) count in the overall mean only."""

    WHOLE_ONLY = ("grad_norm",)  # values that mean nothing per quarter

    def __init__(self, num_steps: int, device, bins: int = 4, tag: str = "q"):
        self.num_steps, self.device, self.bins, self.tag = num_steps, device, bins, tag
        self.reset()

    def reset(self):
        self.sums: dict[str, torch.Tensor] = {}  # name -> [q0, q1, q2, q3, no t] sums ...
        self.counts: dict[str, torch.Tensor] = {}  # ... and counts

    def add(self, t_orig: torch.Tensor | None, values: dict[str, torch.Tensor], keep: torch.Tensor | None = None):
        """Count the values; `keep` (a 0-dim flag on the device) False counts nothing (a skipped step)."""
        for k, v in values.items():
            if t_orig is None or k in self.WHOLE_ONLY:
                q = torch.full((len(v),), self.bins, device=self.device)
            else:
                q = (t_orig.to(self.device) * self.bins // self.num_steps).clamp(0, self.bins - 1)
            ones = torch.ones_like(v)
            if keep is not None:  # where(), not a product: a skipped step's values may be NaN
                v, ones = torch.where(keep, v.detach(), 0), ones * keep
            for table, x in ((self.sums, v.detach()), (self.counts, ones)):
                acc = table.setdefault(k, torch.zeros(self.bins + 1, device=self.device, dtype=torch.float64))
                acc.index_add_(0, q, x.to(self.device, torch.float64))

    def flush(self, accelerator) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[k] for k in names] + [self.counts[k] for k in names])
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
        rows = stacked.tolist()  # the one host sync per log interval
        out = {}
        for k, s, c in zip(names, rows[:len(names)], rows[len(names):]):
            if not sum(c):  # every step of the interval was skipped
                continue
            out[k] = sum(s) / sum(c)
            out.update({f"{k}_{self.tag}{i}": s[i] / c[i] for i in range(self.bins) if c[i]})
        self.reset()
        return out


def flat_hparams(cfg) -> dict:
    """The config as flat {dotted.key: scalar} for the trackers (lists become strings)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)
    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out
