"""A diffusers `UNet2DModel` as a network of the project: (x, t[, y]) -> eps channels.

The adapter is written once here; after it the unet is an eps network on the discrete VP chain
of its scheduler (guided/diffusion/scheduler_config.py), and every sampler and guidance term
serves it through guided.diffusion.models.EpsModel unchanged. Its output is converted to eps
with the chain's alpha_bar at the network time t (x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps,
Ho et al. eq. 4):
- epsilon:       eps as it is;
- v_prediction:  v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, sec. 4), so
                 eps = sqrt(abar) v + sqrt(1 - abar) x_t;
- sample:        eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar).
A learned variance travels in channels C..2C as the paper's networks give it: learned_range as
it is (Nichol & Dhariwal eq. 15); diffusers' `learned` predicts the variance itself, passed on
as its log (the project's `learned` is a log-variance). At fractional t (the score samplers'
clock) log abar is interpolated linearly, as guided.diffusion.sde.DiscreteVPSDE does.

diffusers is an optional extra (`pip install -e ".[diffusers]"`): it is imported on loading only.
Weights are read from a local folder with safetensors, never a pickle; nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from guided.diffusion.sde import lerp_table
from guided.errors import GuidedError
from guided.diffusion import scheduler_config as sc

CLASS_EMBEDS = (None, "timestep")  # an embedding table of num_class_embeds labels, or labels as a sinusoid


class DiffusersUNet(nn.Module):
    """`unet` (a diffusers UNet2DModel) with the interface of guided.networks.unet.UNetModel: `cfg` (image_size,
    in_channels, num_classes, null_class, learn_sigma), `num_classes`, forward(x, t, y=None) -> eps [+ variance].
    `alphas_cumprod`: the scheduler's alpha_bar ([T]); `null_class`: the last label embedding is the
    unconditional one (a model trained with label dropout to it), which classifier-free guidance uses."""

    def __init__(self, unet, alphas_cumprod, prediction_type: str = "epsilon", variance: str = "fixed_small",
                 null_class: bool = False):
        super().__init__()
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        if not isinstance(size, int) and (len(size) != 2 or size[0] != size[1]):
            raise GuidedError(f"the unet makes {size} images: only square images are supported")
        size = size if isinstance(size, int) else size[0]
        if c.class_embed_type not in CLASS_EMBEDS or c.class_embed_type == "timestep" and not c.num_class_embeds:
            raise GuidedError(f"the unet's class_embed_type {c.class_embed_type!r} takes no class indices: "
                              f"supported are an embedding table (num_class_embeds) or 'timestep' with num_class_embeds")
        if getattr(c, "time_embedding_type", "positional") == "fourier":
            raise GuidedError("the unet embeds time with Fourier features of the noise level (a score-SDE VE model, "
                              "as ScoreSdeVePipeline's): it takes no discrete timesteps of a VP chain, which guided "
                              "samples")
        learned = variance in ("learned", "learned_range")
        want = c.in_channels * (2 if learned else 1)
        if c.out_channels != want:
            raise GuidedError(f"the unet gives {c.out_channels} channels for {c.in_channels} input channels; the "
                              f"scheduler's variance_type {variance} needs {want}")
        k = c.num_class_embeds
        num_classes = None if k is None else k - (1 if null_class else 0)
        self.unet, self.prediction_type, self.variance = unet, prediction_type, variance
        self.num_classes = num_classes
        self.cfg = SimpleNamespace(image_size=size, in_channels=c.in_channels, num_classes=num_classes,
                                   null_class=bool(null_class and k), learn_sigma=learned)
        log_abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).log()
        self.register_buffer("log_abar", log_abar, persistent=False)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at network time t (float64), log-linear between integer steps."""
        return lerp_table(self.log_abar.to(t.device), t).exp()

    def forward(self, x, timesteps, y=None):
        if self.num_classes is None and y is not None:
            raise GuidedError("this diffusers unet is unconditional: it takes no class labels")
        out = self.unet(x, timesteps, class_labels=y).sample
        c = x.shape[1]
        pred, var = out[:, :c], out[:, c:]
        if self.prediction_type != "epsilon":
            t = timesteps.reshape(-1)
            abar = self.abar(t.expand(len(x)) if t.numel() == 1 else t)
            a, s = (v.view(-1, *[1] * (x.dim() - 1)) for v in (abar.sqrt(), (1 - abar).sqrt()))
            if self.prediction_type == "v_prediction":
                pred = (a * pred.double() + s * x.double()).to(pred.dtype)
            else:  # sample: x_0
                pred = ((x.double() - a * pred.double()) / s).to(pred.dtype)
        if self.variance == "learned":
            var = var.clamp(min=1e-20).log()
        return torch.cat([pred, var], dim=1) if var.shape[1] else pred


def is_diffusers_folder(path) -> bool:
    """A folder laid out as a diffusers pipeline (model_index.json, unet/, scheduler/) or model (config.json);
    whether it holds a usable UNet2DModel is unet_folder's question."""
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in ("model_index.json", "unet", "scheduler", "config.json"))


def _unet_class(config: Path) -> Optional[str]:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def unet_folder(path) -> Path:
    """The folder of the unet's config.json and weights in a pipeline folder or a unet folder."""
    p = Path(path)
    if not p.exists():
        raise GuidedError(f"{path}: no such diffusers model folder")
    folder = p / "unet" if (p / "unet" / "config.json").is_file() else p
    name = _unet_class(folder / "config.json")
    if name is None:
        raise GuidedError(f"{path} is not a diffusers model: no unet/config.json (or config.json of a UNet2DModel)")
    if name != "UNet2DModel":
        raise GuidedError(f"{path}: the unet is a {name}; only pixel-space UNet2DModel unets are supported")
    return folder


def load_unet(path, scheduler=None, null_class: bool = False, device="cpu"):
    """(DiffusersUNet, DiffusionConfig values) of a diffusers pipeline folder (unet/ + scheduler/) or of a
    unet folder and `scheduler`, a scheduler_config.json (or the folder holding it)."""

    folder = unet_folder(path)
    if scheduler is None and not (Path(path) / "scheduler" / "scheduler_config.json").is_file():
        raise GuidedError(f"{path} has no scheduler/scheduler_config.json: name the scheduler config (--scheduler)")
    sched_path = sc.scheduler_file(path if scheduler is None else scheduler)
    cfg = sc.read(sched_path)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise GuidedError("loading a diffusers model needs diffusers: pip install -e \".[diffusers]\"") from None
    if not any(folder.glob("*.safetensors")):
        raise GuidedError(f"{folder} holds no .safetensors weights (pickled weights are not loaded)")
    try:
        unet = UNet2DModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise GuidedError(f"cannot load the diffusers unet in {folder}: {str(e).strip().splitlines()[0]}") from None
    values = sc.diffusion_values(sched_path, cfg)
    trained_on = getattr(unet.config, "num_train_timesteps", None)
    if trained_on is not None and trained_on != values["steps"]:
        raise GuidedError(f"the unet was trained on {trained_on} timesteps, the scheduler "
                          f"has {values['steps']}")
    alphas_cumprod = torch.cumprod(1 - torch.as_tensor(sc.betas(cfg)), 0)
    net = DiffusersUNet(unet, alphas_cumprod, cfg["prediction_type"], values["variance"], null_class)
    return net.to(device).eval(), values
