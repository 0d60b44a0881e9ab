"""Building blocks of the ADM networks (Dhariwal & Nichol 2021, appendix A).

Parameter names and shapes follow the paper's released code exactly, so that
its checkpoints load with `strict=True`: a ResBlock holds `in_layers`,
`emb_layers`, `out_layers` and `skip_connection`; an attention block holds
`norm`, `qkv` and `proj_out` (1-D convolutions); down/up-sampling convs are
`op` and `conv`. The numerics follow it too (GroupNorm in float32, the
timestep embedding in float32), while attention runs through PyTorch's fused
`scaled_dot_product_attention`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups, computed in float32 whatever the input dtype."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)],
    f_i = max_period^(-i/half) (Vaswani et al. 2017; ADM's `timestep_embedding`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def conv1x1(conv: nn.Conv1d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 Conv1d applied to token-major [B, T, C_in] input, giving [B, T, C_out]: the
    same weights as the checkpoint's conv, run as one matrix product."""
    return F.linear(tokens, conv.weight[..., 0], conv.bias)


def attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """Multi-head self-attention over a token-major packed [B, T, 3*H*C] qkv tensor -> [B, T, H*C].

    `new_order` splits q, k, v first and then heads (the reference's
    `QKVAttention`); otherwise heads first, then q, k, v (`QKVAttentionLegacy`,
    the layout of the released checkpoints). Scale 1/sqrt(C) as in both.
    q, k and v are [B, H, T, C] views whose last dimension is contiguous, the
    layout the fused kernels take (flash on the CPU; flash and memory-efficient
    on CUDA); channel-major views would send SDPA down its slow math path.
    """
    b, length, width = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = qkv.reshape(b, length, 3, heads, ch).permute(2, 0, 3, 1, 4)
    else:
        q, k, v = qkv.reshape(b, length, heads, 3, ch).permute(3, 0, 2, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, C]
    return out.transpose(1, 2).reshape(b, length, heads * ch)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x) if self.use_conv else F.avg_pool2d(x, 2)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning; `use_scale_shift_norm` is the
    adaptive group normalisation of the paper (AdaGN: GroupNorm(h) * (1 + s) + b)."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False,
                 use_checkpoint=False, up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, use_new_attention_order=False,
                 use_checkpoint=False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.new_order = use_new_attention_order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        tokens = self.norm(x).transpose(1, 2)  # [B, T, C]
        h = attention(conv1x1(self.qkv, tokens), self.num_heads, self.new_order)
        return (x + conv1x1(self.proj_out, h).transpose(1, 2)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token, plus a learned positional
    embedding, attends over all positions (the classifier's `attention` head)."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = (x + self.positional_embedding[None].to(x.dtype)).transpose(1, 2)  # [B, T + 1, C]
        x = attention(conv1x1(self.qkv_proj, x), self.num_heads, new_order=True)
        return conv1x1(self.c_proj, x[:, 0])
