"""The data space a model's samples live in, declared once on the model (EDM2's swapped encoder object).

A sampler works on x in the model's space and never assumes pixels: the x0 prediction is clipped or
thresholded only where the space has a range (`clip`), and the sampler's output is turned into
images once, at the end (`finish`); no sampler clamps its own output. `Pixels` is the space of every pixel model (images in [-1, 1]);
a latent space (`LatentSpace`: a VAE's, with encode/decode and no range) declares `range = None`, so
nothing in it is ever clipped to a pixel range, and its `finish` decodes the latents in batches.

The clip kinds (one setting, `SampleOptions.clip`, honoured by every sampler through
guided.guidance.denoiser.GuidedDenoiser):
  static   clamp x0 to the range (the paper's clip_denoised);
  dynamic  Saharia et al. 2022 sec. 2.3: s = max(1, the `percentile` quantile of |x0| per sample),
           x0 = clip(x0, -s, s) / s (as DPM-Solver++ does for pixel-space guided models);
  none     leave x0 as predicted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

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


@dataclass(frozen=True)
class LatentSpace(DataSpace):
    """The latent space of a VAE (diffusers' AutoencoderKL): no range, so x0 is never clipped.

    Latents are scaled as the latent models were trained on them (Rombach et al. 2022 sec. 4.3.2; SD3's
    shift): z = (E(x) - shift) * scaling_factor, and decoded as D(z / scaling_factor + shift). `source`
    is what settings.json records (the VAE's folder); `batch` bounds how many latents are decoded at once."""

    name: str = "latent"
    range: Optional[tuple] = None
    vae: Any = field(default=None, compare=False, repr=False)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    source: str = ""
    batch: int = 8

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def image_shape(self, latent_shape) -> tuple:
        """(C, H, W) of the images of latents of shape (c, h, w): the decoder upsamples by 2 per block but the last."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (int(self.vae.config.out_channels), latent_shape[1] * factor, latent_shape[2] * factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1]: the posterior's mean (deterministic), shifted and scaled."""
        dist = self.vae.encode(images.to(self._dtype())).latent_dist
        return (dist.mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (about [-1, 1]) of latents; differentiable (the x0-classifier's gradient runs through it)."""
        return self.vae.decode(latents.to(self._dtype()) / self.scaling_factor + self.shift_factor).sample

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's latents decoded, `batch` at a time, as float32 images (not clamped: see DataSpace.finish)."""
        with torch.no_grad():
            return torch.cat([self.decode(part).float() for part in x.split(self.batch)])

    def _dtype(self):
        return next(self.vae.parameters()).dtype
