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


def adamw(params, *, lr: float, weight_decay: float, device: torch.device, fused: bool = True):
    """AdamW, fused into one kernel where the device supports it."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused and device.type == "cuda")
