"""Typed configuration: one node per concern, loaded from YAML, saved with the weights.

`load_config(path, overrides)` merges a YAML file from `configs/` and dotted
command-line overrides (`train.batch_size=32`) onto the structured defaults
below in OmegaConf struct mode, so a misspelt key or a wrong type is a
one-line `GuidedError` instead of a silently ignored setting. `train` holds the
settings every run shares, with one node per concern under it: `objective`,
`eval` (the classifier's) and `probe` (the score model's); the flat keys of the
older layout (`train.objective=ncsn`, `train.eval_images=64`) are moved there
by `migrate`, in files, overrides and saved configs alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from guided.errors import GuidedError


@dataclass
class UNetConfig:
    """The score network: the ADM U-Net (Dhariwal & Nichol 2021; `arch: adm`), or a DiT (Peebles & Xie 2023;
    `arch: dit`, guided/networks/dit.py). `attention_resolutions` are image resolutions (as in the paper's
    flags), not downsampling factors. The shared fields: image_size, in_channels, num_classes, null_class,
    learn_sigma; the U-Net's and the DiT's own below."""

    arch: str = "adm"  # adm | dit
    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: List[float] = field(default_factory=lambda: [1, 2, 3, 4])
    attention_resolutions: List[int] = field(default_factory=lambda: [16, 8])
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dropout: float = 0.0
    num_classes: Optional[int] = None
    null_class: bool = False  # one extra label embedding for classifier-free guidance
    learn_sigma: bool = False
    use_checkpoint: bool = False
    # arch: dit (DiT-XL/2: hidden 1152, depth 28, num_heads 16, patch 2; DiT-B/2: 768, 12, 12, 2)
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    mlp_ratio: float = 4.0


@dataclass
class ClassifierConfig:
    """The noise-aware classifier: the U-Net's encoder half plus a pooling head."""

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    num_res_blocks: int = 2
    channel_mult: List[float] = field(default_factory=lambda: [1, 2, 3, 4])
    attention_resolutions: List[int] = field(default_factory=lambda: [32, 16, 8])
    num_heads: int = 1
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    num_classes: int = 1000
    pool: str = "attention"  # adaptive | attention | spatial | spatial_v2
    use_checkpoint: bool = False


@dataclass
class DiffusionConfig:
    steps: int = 1000
    noise_schedule: str = "linear"  # linear | cosine
    variance: str = "fixed_large"  # fixed_large | fixed_small | learned_range | learned
    predict_xstart: bool = False
    loss: str = "mse"  # mse (hybrid when the variance is learned) | rescaled_mse | kl | rescaled_kl
    rescale_timesteps: bool = False
    timestep_respacing: str = ""
    betas_from: Optional[str] = None  # a diffusers scheduler_config.json (or pipeline folder): its betas and spacing


@dataclass
class DataConfig:
    kind: str = "digits"  # digits | imagenet | folder | auto
    root: Optional[str] = None
    image_size: int = 16
    classes: Any = None  # a count, a list of wnids, or null for all
    random_flip: Optional[bool] = None  # None: on for image folders, off for digits
    random_crop: bool = False
    in_memory: Optional[bool] = None
    channels: int = 3
    split: str = "train"  # train | heldout (digits)
    num_workers: int = 0
    val_root: Optional[str] = None  # held-out images (class folders) for the classifier's evaluation
    vae: Optional[str] = None  # a diffusers AutoencoderKL folder: train on its latents (guided/data/latents.py)
    latent_cache: Optional[str] = None  # where the latents are cached (default: <train.out_dir>/latents)


@dataclass
class ObjectiveConfig:
    """train.objective: what the network learns (guided.diffusion.objectives)."""

    name: str = "eps"  # eps | vp_dsm | ncsn
    schedule_sampler: str = "uniform"  # uniform | loss-second-moment | lognormal (eps): how timesteps are drawn
    # name=eps training recipes (guided.diffusion.recipes, docs/training.md); the defaults are the paper's
    weighting: str = "uniform"  # the eps-MSE's weight per level: uniform | min_snr | edm
    min_snr_gamma: float = 5.0  # weighting=min_snr: min(SNR, gamma) / SNR (Hang et al. 2023)
    prediction: str = "eps"  # the U-Net's own output, always converted to eps: eps | v | x0 | edm
    lognormal_mean: float = -1.2  # schedule_sampler=lognormal: ln sigma ~ N(mean, std^2) (Karras et al. 2022)
    lognormal_std: float = 1.2
    sigma_data: float = 0.5  # EDM's sigma_data (weighting=edm, prediction=edm)
    label_dropout: float = 0.0  # > 0 trains a null class for classifier-free guidance
    noised: bool = True  # classifier: train on x_t (the noise-aware objective)
    ncsn_sigma_max: float = 50.0  # name=ncsn: the geometric noise ladder (Song & Ermon 2019)
    ncsn_sigma_min: float = 0.01
    ncsn_levels: int = 232


@dataclass
class EvalConfig:
    """train.eval: the classifier's held-out evaluation and calibration."""

    every: int = 0  # held-out top-1/top-5 per noise quarter every N steps (0 = at the end)
    images: int = 1024  # held-out images per evaluation (each scored at one t in every quarter)
    calibration_bands: int = 8  # temperatures fitted per band of timesteps at the end (0 = off)
    bands: int = 8  # top-1 and ECE logged per band of t (val_acc@1_b*, val_ece_b*): each image once per band
    done_margin: float = 0.005  # "done" once no band's top-1 rose by more than this ...
    done_window: int = 3  # ... over this many evaluations (0 = no done signal)


@dataclass
class ProbeConfig:
    """train.probe: the score model's sample-quality probe on digits (guided/training/probe.py)."""

    every: int = 0  # judge-space FID of EMA samples every N steps (0 = off)
    samples: int = 300  # samples per probe


@dataclass
class PostHocEMAConfig:
    """train.posthoc_ema: EDM2's power-function EMAs, snapshotted for a post-hoc choice of length."""

    sigma_rels: List[float] = field(default_factory=list)  # relative widths tracked, e.g. [0.05, 0.10]; [] = off
    every: int = 1000  # a snapshot of each every N steps (out_dir/phema/)


@dataclass
class TrainConfig:
    batch_size: int = 64  # global: split evenly over the processes
    microbatch: int = 0  # gradient accumulation: per-process chunk size, 0 = whole batch at once
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_rates: List[float] = field(default_factory=lambda: [0.9999])
    ema_warmup: bool = False  # rate_k = min(rate, (1 + k) / (10 + k)) at step k: the initial weights wash out early
    steps: int = 10000
    grad_clip: float = 0.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    log_every: int = 100
    save_every: int = 1000
    snapshot_steps: List[int] = field(default_factory=list)  # also keep the EMA weights of these steps (weak guides)
    out_dir: str = "runs/default"
    keep_checkpoints: int = 2  # full checkpoints kept in out_dir (the newest ones)
    export_dtype: str = "fp32"  # fp32 | fp16: the weights-only model.pt / ema.pt written with each checkpoint
    tracker: str = "tensorboard"  # an Accelerate tracker name, or none
    num_threads: int = 0  # CPU: torch threads per process (0 = torch's default)
    anneal_lr: bool = False
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    channels_last: bool = False  # speed switches (guided/speed.py); all off = the reference's computation
    compile: bool = False
    fused_optimizer: bool = True  # fused AdamW where the device has it (CUDA)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    posthoc_ema: PostHocEMAConfig = field(default_factory=PostHocEMAConfig)


# The flat train.* keys of configs and checkpoints written before train.objective / eval / probe
# were nodes: old key -> (node, key). `migrate` moves them; they keep working everywhere.
RENAMED_TRAIN_KEYS = {
    "objective": ("objective", "name"), "schedule_sampler": ("objective", "schedule_sampler"),
    "label_dropout": ("objective", "label_dropout"), "noised": ("objective", "noised"),
    "ncsn_sigma_max": ("objective", "ncsn_sigma_max"), "ncsn_sigma_min": ("objective", "ncsn_sigma_min"),
    "ncsn_levels": ("objective", "ncsn_levels"), "eval_every": ("eval", "every"),
    "eval_images": ("eval", "images"), "calibration_bands": ("eval", "calibration_bands"),
    "probe_every": ("probe", "every"), "probe_samples": ("probe", "samples"),
}


def migrate(values):
    """A config (DictConfig or dict) with the old flat train.* keys moved to their nodes
    (RENAMED_TRAIN_KEYS); interpolations are kept. Returns a new DictConfig."""
    d = OmegaConf.to_container(values, resolve=False) if isinstance(values, DictConfig) else dict(values)
    train = d.get("train")
    if isinstance(train, dict):
        train = d["train"] = dict(train)
        for old, (group, key) in RENAMED_TRAIN_KEYS.items():
            if old not in train or (old == "objective" and isinstance(train[old], dict)):
                continue
            value = train.pop(old)
            node = train.get(group)
            train[group] = {**(node if isinstance(node, dict) else {}), key: value}
    return OmegaConf.create(d)


def migrate_override(item: str) -> str:
    """`train.<old key>=value` as `train.<node>.<key>=value` (RENAMED_TRAIN_KEYS); others unchanged."""
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) == 2 and parts[0] == "train" and parts[1] in RENAMED_TRAIN_KEYS:
        return "train.{}.{}={}".format(*RENAMED_TRAIN_KEYS[parts[1]], value)
    return item


def saved_config(text: str) -> DictConfig:
    """The RunConfig stored (as YAML text) in a checkpoint or weights file, old layouts included."""
    return merge(structured(), migrate(OmegaConf.create(text)))


@dataclass
class SamplingConfig:
    """A model's own sampling defaults, read after loading (guided.generation.resolve): what a run of
    it uses where the request names nothing. Empty (None) = the sampler registry's defaults."""
    sampler: Optional[str] = None  # with `steps`, when the request names neither sampler nor steps
    steps: Optional[str] = None
    clip: Optional[str] = None  # static | dynamic | none (guided.diffusion.space.CLIPS)
    clip_guided: bool = False  # also clip the guided x0 where the paper's code does not
    classifier: Optional[str] = None  # the noise-aware classifier that guides it by default
    autoguide: Optional[str] = None  # autoguidance's weaker model
    x0_classifier: Optional[str] = None  # a classifier of clean images


@dataclass
class RunConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def structured(schema=RunConfig) -> DictConfig:
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    return cfg


def merge(base: DictConfig, *others) -> DictConfig:
    try:
        return OmegaConf.merge(base, *others)
    except OmegaConfBaseException as e:
        raise GuidedError(f"bad config: {_one_line(e)}") from None


REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # a checkout; an install has guided/configs


def shipped_configs() -> Path:
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else REPO_CONFIGS


def find_config(name: str) -> Path:
    """A config path as given, else a shipped config of that name (with or without .yaml, with or
    without the configs/ folder in front), so `--config digits.yaml` works outside the repository."""
    path = Path(name).expanduser()
    if path.is_file() or path.parent.name not in ("", "configs"):
        return path
    shipped = shipped_configs() / (path.name if path.suffix else path.name + ".yaml")
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in shipped_configs().glob("*.yaml")))
    raise GuidedError(f"config file {path} does not exist, nor is it a shipped config ({known})")


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=RunConfig) -> DictConfig:
    """Structured defaults <- YAML file (a path, or a shipped config's name: find_config) <- dotted overrides,
    validated in struct mode."""
    cfg = structured(schema)
    if path is not None:
        path = find_config(str(path))
        if not path.is_file():
            raise GuidedError(f"config file {path} does not exist (see configs/ for the shipped ones)")
        try:
            loaded = OmegaConf.load(path)
        except (OmegaConfBaseException, yaml.YAMLError) as e:  # YAML syntax
            raise GuidedError(f"cannot read config {path}: {_one_line(e)}") from None
        if not loaded:  # an empty file would silently train the structured defaults
            raise GuidedError(f"config {path} is empty: start from one of the shipped configs (e.g. digits.yaml)")
        cfg = merge(cfg, migrate(loaded))
    for item in overrides:
        if "=" not in item:
            raise GuidedError(f"override {item!r} is not of the form key=value (e.g. train.batch_size=32)")
    if overrides:
        try:
            cfg = merge(cfg, OmegaConf.from_dotlist([migrate_override(item) for item in overrides]))
        except GuidedError:
            raise
        except OmegaConfBaseException as e:
            raise GuidedError(f"bad override: {_one_line(e)}") from None
    if cfg.get("train") is not None and cfg.train.mixed_precision == "False":
        cfg.train.mixed_precision = "no"  # YAML reads `no` (and off, false) as a boolean
    return cfg


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def node(schema, values=None) -> DictConfig:
    """A validated config node of one concern, e.g. node(UNetConfig, {"model_channels": 32})."""
    return merge(structured(schema), values or {})


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0]
    key = getattr(e, "full_key", None)  # OmegaConf names the offending key on a later line
    return f"{key}: {msg}" if key and key not in msg else msg
