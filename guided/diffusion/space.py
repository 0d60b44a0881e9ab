"""The data space a model's samples live in, declared once on the model (EDM2's swapped encoder object).

A sampler works on x in the model's space and never assumes pixels: the x0 prediction is clipped or
thresholded only where the space has a range (`clip`), and the sampler's output is turned into
images once, at the end (`finish`); no sampler clamps its own output. `Pixels` is the space of every pixel model (images in [-1, 1]);
a latent space (a VAE's, with encode/decode and no range) declares `range = None`, so nothing in it
is ever clipped to a pixel range.

The clip kinds (one setting, `SampleOptions.clip`, honoured by every sampler through
guided.guidance.denoiser.GuidedDenoiser):
  static   clamp x0 to the range (the paper's clip_denoised);
  dynamic  Saharia et al. 2022 sec. 2.3: s = max(1, the `percentile` quantile of |x0| per sample),
           x0 = clip(x0, -s, s) / s (as DPM-Solver++ does for pixel-space guided models);
  none     leave x0 as predicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from guided.errors import GuidedError

CLIPS = ("static", "dynamic", "none")


def threshold(x0: torch.Tensor, kind: str = "static", percentile: float = 0.995, bound: float = 1.0) -> torch.Tensor:
    """x0 clipped by `kind` (see the module docstring) to [-bound, bound]."""
    if kind == "none":
        return x0
    if kind == "static":
        return x0.clamp(-bound, bound)
    s = torch.quantile(x0.abs().flatten(1).float(), percentile, dim=1).clamp(min=bound).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s * bound


@dataclass(frozen=True)
class DataSpace:
    """Where samples live: `range` (lo, hi) of a bounded space (pixels), or None (a latent space)."""

    name: str = "pixels"
    range: Optional[tuple] = (-1.0, 1.0)

    @property
    def bounded(self) -> bool:
        return self.range is not None

    def clip(self, x0: torch.Tensor, kind: str = "static", percentile: float = 0.995) -> torch.Tensor:
        """The x0 prediction clipped as `kind` says, only where the space has a range."""
        if not self.bounded or kind == "none":
            return x0
        lo, hi = self.range
        if lo != -hi:
            raise GuidedError(f"the {self.name} space's range {self.range} is not symmetric: clip it with kind none")
        return threshold(x0, kind, percentile, hi)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """A sampler's output as images in float32 (a latent space decodes here). Nothing is clamped: the paper's
        p_sample_loop returns the raw sample and its script clamps when it writes 8 bits, as
        guided.generation.images.to_uint8 does."""
        return x.float()

    def default_clip(self) -> str:
        return "static" if self.bounded else "none"


PIXELS = DataSpace()
