"""The ADM U-Net score model and the noise-aware classifier, built from one encoder.

Both networks share `build_encoder` (the input blocks and the middle block);
the U-Net adds the decoder with skip connections, the classifier a pooling
head. Module names match the paper's released checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn

from guided.networks.nn import (AttentionBlock, AttentionPool2d, Downsample, GroupNorm32, ResBlock, TimestepEmbedSequential,
                 Upsample, timestep_embedding, zero_module)


def _time_embed(model_channels: int) -> nn.Sequential:
    dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def _attention_ds(cfg) -> set[int]:
    """Image resolutions with attention -> the downsampling factors where it sits."""
    return {cfg.image_size // int(res) for res in cfg.attention_resolutions}


def _attn(cfg, ch, heads):
    return AttentionBlock(ch, num_heads=heads, num_head_channels=cfg.num_head_channels,
                          use_new_attention_order=cfg.use_new_attention_order, use_checkpoint=cfg.use_checkpoint)


def _res(cfg, ch, out=None, up=False, down=False):
    return ResBlock(ch, 4 * cfg.model_channels, cfg.dropout, out_channels=out, up=up, down=down,
                    use_scale_shift_norm=cfg.use_scale_shift_norm, use_checkpoint=cfg.use_checkpoint)


def build_encoder(cfg):
    """Input blocks and middle block of the ADM U-Net (the paper's appendix A).

    Returns (input_blocks, middle_block, skip_channels, channels, ds, feature_size):
    the channel count of every block output (for the decoder's skips), the final
    width and downsampling factor, and the sum of block widths (spatial pooling).
    """
    halvings = len(cfg.channel_mult) - 1
    if cfg.image_size < 1 or cfg.image_size % 2**halvings:  # the decoder's skips must meet the encoder's sizes
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of {2**halvings}: the network halves it "
                         f"{halvings} time{'s' if halvings > 1 else ''} (channel_mult has {halvings + 1} levels)")
    attn_ds = _attention_ds(cfg)
    ch = int(cfg.channel_mult[0] * cfg.model_channels)
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
    chans, ds = [ch], 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            out = int(mult * cfg.model_channels)
            layers = [_res(cfg, ch, out)]
            ch = out
            if ds in attn_ds:
                layers.append(_attn(cfg, ch, cfg.num_heads))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            down = _res(cfg, ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, True, ch)
            blocks.append(TimestepEmbedSequential(down))
            chans.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(_res(cfg, ch), _attn(cfg, ch, cfg.num_heads), _res(cfg, ch))
    return blocks, middle, chans, ch, ds, sum(chans) + ch


class UNetModel(nn.Module):
    """ADM U-Net: model(x, timesteps, y=None) -> eps (and the variance
    interpolation v in channels C..2C when `learn_sigma`)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.model_channels = cfg.model_channels
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.time_embed = _time_embed(cfg.model_channels)
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes + int(cfg.null_class), 4 * cfg.model_channels)
        self.input_blocks, self.middle_block, chans, ch, ds, _ = build_encoder(cfg)
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
        attn_ds = _attention_ds(cfg)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                out = int(cfg.model_channels * mult)
                layers = [_res(cfg, ch + chans.pop(), out)]
                ch = out
                if ds in attn_ds:
                    layers.append(_attn(cfg, ch, heads_up))
                if level and i == cfg.num_res_blocks:
                    layers.append(_res(cfg, ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, True, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


class EncoderUNetModel(nn.Module):
    """The noise-aware classifier p(y | x_t, t): the U-Net encoder and a pooling
    head (`adaptive`, `attention`, `spatial` or `spatial_v2`)."""

    POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

    def __init__(self, cfg):
        super().__init__()
        if cfg.pool not in self.POOLS:
            raise ValueError(f"unknown classifier pool {cfg.pool!r}; choose one of {', '.join(self.POOLS)}")
        self.cfg = cfg
        self.pool = cfg.pool
        self.model_channels = cfg.model_channels
        self.time_embed = _time_embed(cfg.model_channels)
        self.input_blocks, self.middle_block, _, ch, ds, feature_size = build_encoder(cfg)
        n = cfg.num_classes
        if cfg.pool == "adaptive":
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     zero_module(nn.Conv2d(ch, n, 1)), nn.Flatten())
        elif cfg.pool == "attention":
            if cfg.num_head_channels == -1:
                raise ValueError("the attention pool needs num_head_channels != -1")
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                     AttentionPool2d(cfg.image_size // ds, ch, cfg.num_head_channels, n))
        elif cfg.pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, n))
        else:
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), GroupNorm32(2048), nn.SiLU(), nn.Linear(2048, n))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        spatial = self.pool.startswith("spatial")
        pooled, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                pooled.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            pooled.append(h.mean(dim=(2, 3)))
            h = torch.cat(pooled, dim=-1)
        return self.out(h)
