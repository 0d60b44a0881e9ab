"""Speed switches shared by the trainers and the sampler; every one is off by default,
and none changes what is computed beyond rounding (tests/test_speed.py).

- channels-last memory layout (NHWC convolutions, the fast path of cuDNN and oneDNN);
- torch.compile of a network (fused normalisation and activation kernels), optionally replaying
  each fixed-shape call as a CUDA graph (launch overhead gone: the sampling loop's fixed shapes);
- fused AdamW (one kernel for all parameters; CUDA only);
- bf16/fp16 autocast is the trainer's train.mixed_precision and the sampler's --precision.
Attention always runs through the fused scaled_dot_product_attention kernels.
"""
from __future__ import annotations

import torch


def speed_up(net: torch.nn.Module, *, channels_last: bool = False, compile: bool = False,
             cuda_graphs: bool = False) -> torch.nn.Module:
    """The network with the chosen switches; parameters are shared, so its state dict is unchanged.
    `cuda_graphs` compiles in "reduce-overhead" mode, which replays the fixed-shape step as a CUDA graph."""
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if compile or cuda_graphs:
        net = torch.compile(net, mode="reduce-overhead" if cuda_graphs else None)
    return net


class DeviceCopies:
    """Host tensors (a schedule's tables) copied to a device once, on first use. A copy from the
    host in every step would make the host wait for the device each time (CUDA synchronises a
    blocking host-to-device copy), so a sampling loop or training step could never run ahead."""

    def __init__(self):
        self._copies: dict = {}

    def __call__(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        if tensor.device == device:
            return tensor
        key = (id(tensor), device)
        hit = self._copies.get(key)
        if hit is None or hit[0] is not tensor:  # the source is kept, so its id is never reused
            hit = self._copies[key] = (tensor, tensor.to(device))
        return hit[1]


def adamw(params, *, lr: float, weight_decay: float, device: torch.device, fused: bool = True):
    """AdamW, fused into one kernel where the device supports it."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused and device.type == "cuda")
