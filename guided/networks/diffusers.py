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

A latent model is the same adapter over a VAE's latents: `DiffusersDiT` adapts a DiT (Peebles & Xie 2023;
diffusers' DiTTransformer2DModel, or the Transformer2DModel the published DiT folders name), and a
UNet2DModel folder with a vae/ (or --vae) is a latent U-Net; `load_latent` pairs either with its
AutoencoderKL as a guided.diffusion.space.LatentSpace, which the model's ScoreModel carries.

diffusers is an optional extra (`pip install -e ".[diffusers]"`): it is imported on loading only.
Weights are read from a local folder with safetensors, never a pickle; nothing is downloaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from guided.diffusion.sde import lerp_table
from guided.diffusion.space import LatentSpace
from guided.errors import GuidedError
from guided.diffusion import scheduler_config as sc

CLASS_EMBEDS = (None, "timestep")  # an embedding table of num_class_embeds labels, or labels as a sinusoid


class _Adapter(nn.Module):
    """The part every diffusers network shares: the scheduler's alpha_bar at network time t and the
    conversion of its prediction to eps (module docstring) and of its variance channels."""

    def _schedule(self, alphas_cumprod, prediction_type: str, variance: str):
        self.prediction_type, self.variance = prediction_type, variance
        log_abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).log()
        self.register_buffer("log_abar", log_abar, persistent=False)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at network time t (float64), log-linear between integer steps."""
        return lerp_table(self.log_abar.to(t.device), t).exp()

    def _as_eps(self, out, x, timesteps):
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


class DiffusersUNet(_Adapter):
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
        self.unet = unet
        self.num_classes = num_classes
        self.cfg = SimpleNamespace(image_size=size, in_channels=c.in_channels, num_classes=num_classes,
                                   null_class=bool(null_class and k), learn_sigma=learned)
        self._schedule(alphas_cumprod, prediction_type, variance)

    def forward(self, x, timesteps, y=None):
        if self.num_classes is None and y is not None:
            raise GuidedError("this diffusers unet is unconditional: it takes no class labels")
        return self._as_eps(self.unet(x, timesteps, class_labels=y).sample, x, timesteps)


# the sampler of a latent folder's scheduler class, as diffusers' pipeline steps it (its default: 50 steps)
SCHEDULER_SAMPLERS = {"DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm++", "DDPMScheduler": "ddpm"}
PIPELINE_STEPS = "50"  # DiTPipeline's num_inference_steps

DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the published DiT folders name the second


class DiffusersDiT(_Adapter):
    """A class-conditional DiT with the interface of DiffusersUNet: `cfg` (image_size = the latent size,
    in_channels = the latent channels, num_classes = num_embeds_ada_norm, null_class: the label embedding's
    extra row, index num_embeds_ada_norm, that DiT was trained to with 10% label dropout, Peebles & Xie
    sec. 3.1), forward(x, t, y=None) -> eps [+ variance]. DiT-XL/2 gives 2C channels: its learned sigma is
    the paper's learned_range (Nichol & Dhariwal eq. 15), passed on as it is; y=None is the null label."""

    def __init__(self, transformer, alphas_cumprod, prediction_type: str = "epsilon", variance: str = "learned_range"):
        super().__init__()
        c = transformer.config
        size, out = c.sample_size, c.out_channels or c.in_channels
        if not isinstance(size, int):
            raise GuidedError(f"the DiT's sample_size {size} is not one square latent size")
        if out not in (c.in_channels, 2 * c.in_channels):
            raise GuidedError(f"the DiT gives {out} channels for {c.in_channels} input channels: expected "
                              f"{c.in_channels} (eps) or {2 * c.in_channels} (eps + learned sigma)")
        if c.num_embeds_ada_norm is None:
            raise GuidedError("the transformer has no class embedding (num_embeds_ada_norm): not a class-conditional DiT")
        self.transformer, self.num_classes = transformer, int(c.num_embeds_ada_norm)
        self.cfg = SimpleNamespace(image_size=size, in_channels=c.in_channels, num_classes=self.num_classes,
                                   null_class=True, learn_sigma=out == 2 * c.in_channels)
        self._schedule(alphas_cumprod, prediction_type, variance)

    def forward(self, x, timesteps, y=None):
        t = timesteps.reshape(-1)
        t = t.expand(len(x)) if t.numel() == 1 else t
        y = torch.full((len(x),), self.num_classes, device=x.device, dtype=torch.long) if y is None else y
        return self._as_eps(self.transformer(x, timestep=t, class_labels=y).sample, x, timesteps)


def is_diffusers_folder(path) -> bool:
    """A folder laid out as a diffusers pipeline (model_index.json, unet/, scheduler/) or model (config.json);
    whether it holds a usable UNet2DModel is unet_folder's question."""
    p = Path(path)
    return p.is_dir() and any((p / n).exists() for n in ("model_index.json", "unet", "transformer", "scheduler",
                                                          "config.json"))


def _unet_class(config: Path) -> Optional[str]:
    try:
        return json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def network_folder(path) -> tuple[Path, str]:
    """(the folder of the network's config.json and weights, its class name) in a pipeline folder
    (unet/ or transformer/) or a model folder."""
    p = Path(path)
    if not p.exists():
        raise GuidedError(f"{path}: no such diffusers model folder")
    folder = next((p / sub for sub in ("unet", "transformer") if (p / sub / "config.json").is_file()), p)
    name = _unet_class(folder / "config.json")
    if name is None:
        raise GuidedError(f"{path} is not a diffusers model: no unet/config.json, transformer/config.json or config.json "
                          f"of a UNet2DModel or DiT")
    if name != "UNet2DModel" and name not in DIT_CLASSES:
        raise GuidedError(f"{path}: the network is a {name}; supported are UNet2DModel (on pixels or latents) and "
                          f"DiT ({', '.join(DIT_CLASSES)})")
    return folder, name


def _scheduler(path, scheduler):
    """(the scheduler_config.json, its validated values) of a pipeline folder, or `scheduler` where given."""
    if scheduler is None and not (Path(path) / "scheduler" / "scheduler_config.json").is_file():
        raise GuidedError(f"{path} has no scheduler/scheduler_config.json: name the scheduler config (--scheduler)")
    sched_path = sc.scheduler_file(path if scheduler is None else scheduler)
    return sched_path, sc.read(sched_path)


def _from_pretrained(class_name: str, folder: Path, what: str):
    """A diffusers model of `class_name` from safetensors in a local folder (never a pickle, never a download)."""
    try:
        import diffusers
    except ImportError:
        raise GuidedError("loading a diffusers model needs diffusers: pip install -e \".[diffusers]\"") from None
    if not any(folder.glob("*.safetensors")):
        raise GuidedError(f"{folder} holds no .safetensors weights (pickled weights are not loaded)")
    try:
        return getattr(diffusers, class_name).from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise GuidedError(f"cannot load the diffusers {what} in {folder}: {str(e).strip().splitlines()[0]}") from None


def load_network(path, scheduler=None, null_class: bool = False):
    """(DiffusersUNet or DiffusersDiT, DiffusionConfig values) of a diffusers pipeline folder (unet/ or
    transformer/, and scheduler/) or of a network folder and `scheduler`, a scheduler_config.json (or the
    folder holding it). A DiT's learned sigma is used by ddpm as learned_range, as DiT was trained (Peebles &
    Xie sec. 3.1), where the scheduler declares no variance_type (DDIM's, DPM-Solver's); one that declares it
    (DDPMScheduler's) is followed, as DiTPipeline does (it passes the eps channels alone to the scheduler)."""
    folder, name = network_folder(path)
    sched_path, cfg = _scheduler(path, scheduler)
    values = sc.diffusion_values(sched_path, cfg)
    alphas_cumprod = torch.cumprod(1 - torch.as_tensor(sc.betas(cfg)), 0)
    if name in DIT_CLASSES:
        net = DiffusersDiT(_from_pretrained(name, folder, "transformer"), alphas_cumprod, cfg["prediction_type"])
        declared = json.loads(sched_path.read_text()).get("variance_type") is not None  # DDPMScheduler's
        if net.cfg.learn_sigma and not declared:
            values["variance"] = "learned_range"
        net.variance = values["variance"]
        return net.eval(), values
    unet = _from_pretrained("UNet2DModel", folder, "unet")
    trained_on = getattr(unet.config, "num_train_timesteps", None)
    if trained_on is not None and trained_on != values["steps"]:
        raise GuidedError(f"the unet was trained on {trained_on} timesteps, the scheduler "
                          f"has {values['steps']}")
    net = DiffusersUNet(unet, alphas_cumprod, cfg["prediction_type"], values["variance"], null_class)
    return net.eval(), values


def load_unet(path, scheduler=None, null_class: bool = False, device="cpu"):
    """(network, DiffusionConfig values) of a diffusers folder, on `device` (see load_network)."""
    net, values = load_network(path, scheduler, null_class)
    return net.to(device), values


def load_vae(path, option: str = "--vae") -> LatentSpace:
    """The latent space of an AutoencoderKL: a VAE folder (config.json + safetensors) or a pipeline folder's vae/.
    `option`: how the user named it (--vae, data.vae), for the messages."""
    p = Path(path)
    if not p.exists():
        raise GuidedError(f"{option} {path}: no such folder (a diffusers AutoencoderKL folder; nothing is downloaded)")
    folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
    name = _unet_class(folder / "config.json")
    if name is None:
        raise GuidedError(f"{path} holds no VAE: no vae/config.json (or config.json of an AutoencoderKL)")
    if name != "AutoencoderKL":
        raise GuidedError(f"{path}: the VAE is a {name}; only AutoencoderKL latents are supported")
    vae = _from_pretrained("AutoencoderKL", folder, "VAE").eval().requires_grad_(False)
    c = vae.config
    return LatentSpace(vae=vae, scaling_factor=float(c.scaling_factor),
                       shift_factor=float(getattr(c, "shift_factor", None) or 0.0), source=str(path))


def default_sampler(path, scheduler=None) -> Optional[str]:
    """The registry's sampler that steps as the folder's scheduler class does (SCHEDULER_SAMPLERS), or None."""
    name = json.loads(_scheduler(path, scheduler)[0].read_text()).get("_class_name")
    return SCHEDULER_SAMPLERS.get(name)


def load_latent(path, scheduler=None, vae=None):
    """(network, DiffusionConfig values, LatentSpace or None) of a diffusers folder: a DiT, or a UNet2DModel
    with the VAE of its vae/ or of `vae` (a latent model); a UNet2DModel without either is a pixel model (None).
    A VAE must make latents of the network's channels."""
    _, name = network_folder(path)
    if vae is None and not (Path(path) / "vae" / "config.json").is_file():
        if name in DIT_CLASSES:
            raise GuidedError(f"{path}: a DiT samples a VAE's latents but the folder has no vae/: give its VAE "
                              f"with --vae FOLDER")
        return (*load_network(path, scheduler), None)
    space = load_vae(Path(path) if vae is None else vae)
    net, values = load_network(path, scheduler)
    if space.latent_channels != net.cfg.in_channels:
        raise GuidedError(f"the VAE of {space.source} makes {space.latent_channels}-channel latents but the network "
                          f"takes {net.cfg.in_channels} channels: use the VAE the model was trained with")
    if json.loads(_scheduler(path, scheduler)[0].read_text()).get("clip_sample") is True:
        print(f"note: {path}: the scheduler's clip_sample is not applied: latents have no range, so they are "
              f"never clipped (diffusers' pipeline would clip them to [-1, 1])", file=sys.stderr)
    return net, values, space
