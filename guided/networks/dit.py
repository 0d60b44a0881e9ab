"""DiT: the diffusion transformer of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers"),
written as their released models.py builds it, so that its state dict is theirs key for key (an official
DiT-XL-2-256x256.pt loads with load_state_dict as it is).

The network is an eps model with the paper's learned sigma, the ADM U-Net's contract: model(x, t, y) ->
eps [+ the variance interpolation v in channels C..2C] (Nichol & Dhariwal eq. 15), t the chain's timestep
(fractional between steps), y a class index or index num_classes, the null label of classifier-free
guidance. So the trainers, loaders, samplers and guidance terms serve it as they serve the U-Net.

- Patches: a p x p convolution of stride p (x_embedder), plus a fixed 2-D sin-cos position embedding.
- Conditioning c = t_embedder(t) + y_embedder(y): ADM's sinusoidal timestep embedding (the same as the
  paper's code) through a 2-layer MLP, plus a label table with one extra row for the null label.
- Blocks, adaLN-Zero (sec. 3.2): shift, scale and gate of both sublayers regressed from c by a linear layer
  initialised to zero, so each block starts as the identity:
  x += gate_msa * Attn(LN(x) (1 + scale_msa) + shift_msa);  x += gate_mlp * MLP(LN(x) (1 + scale_mlp) + shift_mlp).
- Final layer: adaLN (shift, scale), then a zero-initialised linear to p x p x C_out per token, unpatchified.

Label dropout for classifier-free guidance is the trainer's (train.objective.label_dropout), as for the
U-Net: the network itself never drops labels (the paper's LabelEmbedder drops them in train mode).

diffusers' DiTTransformer2DModel holds the same weights with the embedders copied into every block, and
embeds t with frequencies max_period^(-i / (half - 1)) (downscale_freq_shift=1) where the paper's code
uses max_period^(-i / half): on the same weights the two differ (tests/test_dit.py measures it).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from guided.networks.nn import attention, timestep_embedding


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid^2, dim] fixed position embedding (the paper's get_2d_sincos_pos_embed): half the channels
    encode the column, half the row, each as [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-2i/(dim/2))."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return torch.from_numpy(np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)).float()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with one packed qkv projection (timm's layout: q, k, v, then heads)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(attention(self.qkv(x), self.heads, new_order=True))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (Peebles & Xie sec. 3.2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, T, D], tokens row-major


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequencies))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int, null_class: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), dim)

    def forward(self, y):
        return self.embedding_table(y)


class DiT(nn.Module):
    """The diffusion transformer of a model config node with arch "dit": `image_size` (the latent or image
    side), `in_channels`, `patch_size`, `hidden_size`, `depth`, `num_heads`, `mlp_ratio`, `num_classes`,
    `null_class`, `learn_sigma`. DiT-XL/2: hidden 1152, depth 28, 16 heads, patch 2 (the paper's table 1)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.num_classes is None:
            raise ValueError("a DiT is class-conditional: set model.num_classes")
        if cfg.image_size % cfg.patch_size or cfg.hidden_size % cfg.num_heads or cfg.hidden_size % 4:
            raise ValueError(f"DiT: image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}, "
                             f"hidden_size {cfg.hidden_size} of num_heads {cfg.num_heads} and of 4")
        self.cfg, self.num_classes, self.patch = cfg, cfg.num_classes, cfg.patch_size
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        dim, grid = cfg.hidden_size, cfg.image_size // cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(cfg.num_classes, dim, cfg.null_class)
        self.pos_embed = nn.Parameter(sincos_2d(dim, grid).unsqueeze(0), requires_grad=False)  # fixed, saved
        self.blocks = nn.ModuleList(DiTBlock(dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(dim, cfg.patch_size, self.out_channels)
        self._initialize()

    def _initialize(self):
        """The paper's initialisation: xavier-uniform linears (and the patch projection as a linear), normal(0.02)
        embedders, and adaLN-Zero: every modulation and the output layer start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """[B, T, p*p*C] -> [B, C, H, W]."""
        p, c, h = self.patch, self.out_channels, self.cfg.image_size // self.patch
        x = x.reshape(len(x), h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(len(x), c, h * p, h * p)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("a DiT is class-conditional: pass y (index num_classes is the null label)")
        tokens = self.x_embedder(x) + self.pos_embed
        t = timesteps.reshape(-1).expand(len(x)) if timesteps.numel() == 1 else timesteps
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


# -- the released checkpoints (facebookresearch/DiT: DiT-XL-2-256x256.pt, ...) ------------------------------------
RELEASED_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}  # XL, L, B, S: heads are not in the weights' shapes


def released_state_dict(path) -> dict | None:
    """The state dict of a released DiT checkpoint (a plain state dict, or train.py's {"ema": ...} checkpoint),
    or None when `path` is not one. Read memory-mapped where the file allows, so a look is cheap."""
    if not str(path).endswith((".pt", ".pth")):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, a damaged file, not a file: not ours to say here
        return None
    if isinstance(obj, dict) and isinstance(obj.get("ema"), dict):
        obj = obj["ema"]
    keys = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight", "pos_embed")
    return obj if isinstance(obj, dict) and all(k in obj for k in keys) else None


def released_config(sd: dict) -> dict:
    """The model config values (arch dit) of a released DiT's state dict, read off its shapes."""
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    tokens = sd["pos_embed"].shape[1]
    grid = round(tokens ** 0.5)
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    heads = RELEASED_HEADS.get(hidden, hidden // 64 if hidden % 64 == 0 else None)
    if heads is None or grid * grid != tokens:
        raise ValueError(f"a DiT of width {hidden} and {tokens} tokens is none of the released shapes")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return dict(arch="dit", image_size=grid * patch, in_channels=in_channels, patch_size=patch, hidden_size=hidden,
                depth=depth, num_heads=heads, num_classes=rows - 1, null_class=True, learn_sigma=out == 2 * in_channels)
