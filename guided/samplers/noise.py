"""The per-sample noise every sampler draws from."""
from __future__ import annotations

import torch


class SampleNoise:
    """One random generator per sample (EDM's StackedRandomGenerator): sample i
    draws from a generator seeded with `seeds[i]`, so the same seed gives the same
    image whatever the batch size or process count.

    The generators live on the sampling device and draw there: no noise crosses from
    the host in the loop. A CPU generator and a CUDA one give different streams from
    one seed, so a seed's image depends on the kind of device (on the CPU it is the
    stream of torch.Generator().manual_seed(seed), as it always was)."""

    def __init__(self, seeds, device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape) -> torch.Tensor:
        """A [len(seeds), *shape] standard normal tensor on the device."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:]).to(x.dtype)
