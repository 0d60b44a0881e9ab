"""Class-conditional generation with guidance: the library behind sample_guided.py.

`Pipeline` bundles a score model, its diffusion settings, an optional
noise-aware classifier and the label map. `sample_batch` draws one batch;
`generate` draws N samples into an output folder in the paper's npz layout,
batch by batch, each finished batch saved atomically so an interrupted run
resumes where it stopped. Sample i always uses seed `seed + i`, so the images
do not depend on the batch size or the number of processes.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from guided.files import atomic_write
from guided.diffusion.gaussian import create_diffusion
from guided.errors import GuidedError
from guided.guidance.terms import Guidance, Term, ladder_sigma, vp_denoiser, vp_sigma
from guided.locks import first_rank, lock_folder
from guided.samplers.discrete import SAMPLERS, SampleNoise


@dataclass
class Pipeline:
    model: torch.nn.Module
    diffusion_cfg: object  # DiffusionConfig node
    classifier: Optional[torch.nn.Module] = None
    label_map: object = None  # guided.data.labels.LabelMap or None
    name: str = "model"
    objective: str = "eps"  # how the model was trained: eps | vp_dsm (eps networks) | ncsn (score network)
    ncsn_sigmas: Optional[torch.Tensor] = None  # the noise ladder of an NCSN model
    unconditional: bool = False  # sample a label-dropout model's null class (its unconditional score)
    weak_model: Optional[torch.nn.Module] = None  # autoguidance's weaker model, same conditioning
    x0_classifier: Optional[torch.nn.Module] = None  # a classifier of clean images, for x0-classifier guidance

    def __post_init__(self):
        m = self.model.cfg
        for what, net in (("classifier", self.classifier), ("x0 classifier", self.x0_classifier),
                          ("weak model", self.weak_model)):
            c = getattr(net, "cfg", None)
            if c is not None and (c.image_size != m.image_size or c.in_channels != m.in_channels):
                raise GuidedError(f"the {what} takes {c.image_size}x{c.image_size}x{c.in_channels} images but the "
                                  f"score model makes {m.image_size}x{m.image_size}x{m.in_channels}: use a matching pair")
        if self.weak_model is not None and self.weak_model.num_classes != self.model.num_classes:
            raise GuidedError("the autoguidance model must have the main model's conditioning "
                              f"({self.model.num_classes} classes, not {self.weak_model.num_classes})")
        if self.unconditional and not getattr(m, "null_class", False):
            raise GuidedError("only a model trained with label dropout (model.null_class) has an unconditional score")

    @property
    def conditional(self) -> bool:
        """Whether the network itself takes the asked labels."""
        return self.model.num_classes is not None and not self.unconditional

    @property
    def num_classes(self) -> Optional[int]:
        if self.model.num_classes is not None:
            return self.model.num_classes
        return self.classifier.cfg.num_classes if self.classifier is not None else None

    def shape(self) -> tuple[int, int, int]:
        cfg = self.model.cfg
        return (cfg.in_channels, cfg.image_size, cfg.image_size)


@dataclass
class SampleOptions:
    sampler: str = "ddpm"
    steps: str = "250"
    scale: float = 0.0
    cfg_scale: float = 1.0
    eta: float = 0.0
    clip_denoised: bool = True
    # Clip x0 again where the paper's code does not: the guided x0 of ddim and dpm++ (after the
    # score correction), the x0 behind the eps of pc and ode. Off = the paper's arithmetic.
    clip_guided: bool = False
    precision: str = "fp32"
    extra: dict = field(default_factory=dict)  # sampler-specific settings (snr, rtol, ...)
    # the guidance layer (guided/guidance.py): every term has a scale and an interval (sigma_lo, sigma_hi)
    interval: Optional[tuple] = None  # the noise-aware classifier's; None = every level
    schedule: str = "constant"  # the classifier's weight over sigma (guidance.SCHEDULES)
    calibration: bool = True  # divide the classifier's logits by its fitted temperatures, when it has them
    ddpm_form: str = "mean"  # DDPM: the paper's mean shift (Algorithm 1) or the score correction
    cfg_interval: Optional[tuple] = None
    autoguide_scale: float = 1.0  # w of autoguidance (1 = off); needs Pipeline.weak_model
    autoguide_interval: Optional[tuple] = None
    x0_scale: float = 0.0  # a clean-image classifier on x0_hat (0 = off); needs Pipeline.x0_classifier
    x0_temperature: float = 1.0
    x0_interval: Optional[tuple] = None
    x0_schedule: str = "constant"


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, as the reference's sample script does; a one-channel (grey) model's
    samples become three equal channels, the RGB layout of the paper's evaluation batches."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def check_labels(p: Pipeline, labels, opts: SampleOptions):
    n = p.num_classes
    if n is None and (opts.scale or opts.cfg_scale != 1.0):
        raise GuidedError("guidance needs a class-conditional model or a classifier; neither was given")
    if n is not None and any(not 0 <= int(y) < n for y in labels):
        raise GuidedError(f"class {max(labels)} is outside the model's {n} classes (0..{n - 1})")
    if opts.scale and p.classifier is None:
        raise GuidedError("--scale needs a noise-aware classifier (--classifier)")
    k = p.classifier.cfg.num_classes if opts.scale else None
    if k is not None and any(not 0 <= int(y) < k for y in labels):
        raise GuidedError(f"class {max(labels)} is outside the classifier's {k} classes (0..{k - 1}): guide with a "
                          f"classifier of the model's classes")
    if opts.cfg_scale != 1.0 and not (getattr(p.model.cfg, "null_class", False) and p.conditional):
        raise GuidedError("--cfg-scale needs a class-conditional model trained with label dropout (model.null_class)")
    if opts.autoguide_scale != 1.0 and p.weak_model is None:
        raise GuidedError("--autoguide-scale needs a weaker model (--autoguide)")
    if opts.x0_scale and p.x0_classifier is None:
        raise GuidedError("--x0-scale needs a classifier of clean images (--x0-classifier)")


def guidance(p: Pipeline, opts: SampleOptions) -> Guidance:
    """The guidance terms the options ask for, over the pipeline's networks (guided/guidance.py)."""
    if p.objective == "ncsn":
        sigma_of = ladder_sigma(p.ncsn_sigmas)
    else:
        sigma_of = vp_sigma(create_diffusion(p.diffusion_cfg, "").alphas_cumprod)
    terms = [Term("classifier", opts.scale, p.classifier, opts.interval, opts.schedule, calibrated=opts.calibration),
             Term("cfg", opts.cfg_scale, None, opts.cfg_interval),
             Term("autoguide", opts.autoguide_scale, p.weak_model, opts.autoguide_interval),
             Term("x0_classifier", opts.x0_scale, _clean_classifier(p.x0_classifier), opts.x0_interval,
                  opts.x0_schedule, temperature=opts.x0_temperature)]
    null = p.model.num_classes if getattr(p.model.cfg, "null_class", False) else None
    return Guidance(terms, sigma_of, null_label=null)


def _clean_classifier(net):
    """classify(x0) -> logits of a clean-image classifier: one of ours sees timestep 0, any other module x0 alone."""
    if net is None or not hasattr(net, "cfg"):
        return net
    return lambda x0: net(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device))


def network_labels(p: Pipeline, y: torch.Tensor) -> Optional[torch.Tensor]:
    """What the score network is given: the asked labels, the null class, or nothing."""
    if p.model.num_classes is None:
        return None
    return torch.full_like(y, p.model.num_classes) if p.unconditional else y


def guided_functions(p: Pipeline, y: torch.Tensor, opts: SampleOptions):
    """(model_fn, cond_fn) of the pipeline for labels y: every sampler's guidance (see sampling.py)."""
    g = guidance(p, opts)
    model_fn = g.model_fn(p.model, network_labels(p, y))
    denoise = None
    if p.objective != "ncsn" and opts.x0_scale:
        denoise = vp_denoiser(model_fn, create_diffusion(p.diffusion_cfg, "").alphas_cumprod)
    return model_fn, g.cond_fn(y, denoise)


SCORE_FAMILY = ("pc", "ode", "langevin")


def check_sampler(p: Pipeline, sampler: str) -> None:
    """Refuse a sampler the model cannot serve, in one line."""
    if sampler not in (*SAMPLERS, *SCORE_FAMILY):
        raise GuidedError(f"unknown sampler {sampler!r}; choose one of {', '.join((*SAMPLERS, *SCORE_FAMILY))}")
    if p.objective == "ncsn" and sampler not in ("langevin", "pc"):
        raise GuidedError(f"an NCSN model (a noise-conditional score network) cannot use the {sampler} sampler, "
                          "which needs an eps-prediction model: use --sampler langevin or pc")
    if p.objective != "ncsn" and sampler == "langevin":
        raise GuidedError("annealed Langevin dynamics needs an NCSN model (train.objective=ncsn); "
                          "for this eps-prediction model use ddpm, ddim, dpm++, pc or ode")


def sample_batch(p: Pipeline, labels, seeds, opts: SampleOptions, *, device="cpu", progress=False,
                 init: Optional[dict] = None, x_T: Optional[torch.Tensor] = None, preview=None) -> torch.Tensor:
    """Draw len(labels) samples in [-1, 1]; sample i uses the generator seeded with seeds[i].
    `init` (SDEdit) holds `image` [C,H,W] in [-1, 1], `t0` in (0, 1] and an optional `mask` [1,H,W]
    (1 = may change). `x_T`: start from this noise instead of drawing it (e.g. a reference run's).
    `preview(done, x0)`, if given, is called along the way with the share of the reverse process
    done, in (0, 1], and the current denoised prediction (the x0 estimate)."""
    check_sampler(p, opts.sampler)
    if opts.sampler in SCORE_FAMILY:
        return sample_score_family(p, labels, seeds, opts, device=device, progress=progress, init=init, x_T=x_T,
                                   preview=preview)
    device = torch.device(device)
    noise = SampleNoise(seeds, device)
    x = noise.randn(p.shape()) if x_T is None else x_T.to(device)
    diffusion, model_fn, kw = discrete_sampler(p, labels, opts, noise, progress=progress)
    if init is not None:
        x = _sdedit_start(diffusion, init, x, noise, kw)
    if preview is not None:
        n = kw.get("start_index", diffusion.num_timesteps - 1) + 1
        kw["callback"] = lambda i, x_i, x0: preview((n - i) / n, x0)
    with _autocast(device, opts.precision):
        out = SAMPLERS[opts.sampler](diffusion, model_fn, x, **kw)
    return out.float()


def discrete_sampler(p: Pipeline, labels, opts: SampleOptions, noise: SampleNoise, *, progress=False):
    """(diffusion, model_fn, keywords) with which sample_batch runs SAMPLERS[opts.sampler]: every
    choice the application makes about guidance and clipping, in one place."""
    diffusion = create_diffusion(p.diffusion_cfg, str(opts.steps))
    y = torch.as_tensor(list(labels), device=noise.device, dtype=torch.long)
    model_fn, cond_fn = guided_functions(p, y, opts)
    kw = dict(noise=noise, clip_denoised=opts.clip_denoised, progress=progress, cond_fn=cond_fn)
    if opts.sampler == "ddim":
        kw["eta"] = opts.eta
    if opts.sampler == "ddpm":
        kw["guidance_form"] = opts.ddpm_form
    if opts.sampler != "ddpm" or opts.ddpm_form == "score":  # the score form (Algorithm 2)
        kw["clip_guided"] = opts.clip_guided  # see sampling.guided_p_mean_variance
    return diffusion, model_fn, kw


def score_function(p: Pipeline, y: torch.Tensor, opts: SampleOptions):
    """(score_fn, sde) of the pipeline: s(x, t) = grad log p_t(x), guided when asked.
    An eps network is a score model of the VP SDE of its own discrete schedule; an
    NCSN network one of the VE SDE spanning its noise ladder."""
    from guided.samplers.score import LadderTime, guided_score, ncsn_score, score_from_eps
    from guided.diffusion.sde import VESDE, VPSDE

    model_fn, cond_fn = guided_functions(p, y, opts)
    if p.objective == "ncsn":
        sigmas = p.ncsn_sigmas
        sde, clock = VESDE(float(sigmas[-1]), float(sigmas[0])), LadderTime(sigmas)
        score = ncsn_score(model_fn, sigmas)
    else:
        sde = clock = VPSDE.from_alphas_cumprod(create_diffusion(p.diffusion_cfg, "").alphas_cumprod)
        clip = opts.clip_denoised and opts.clip_guided
        score = score_from_eps(lambda x, t: clipped_eps(model_fn, sde, x, t, clip), sde)
    if cond_fn is not None:  # the gradient terms see the networks' timesteps (an NCSN's ladder index)
        score = guided_score(score, lambda x, t: cond_fn(x, clock.model_time(t)), 1.0)
    return score, sde


def clipped_eps(model_fn, sde, x, t, clip: bool):
    """The network's eps at SDE time t; with `clip` (SampleOptions.clip_guided), re-derived from
    the x0 prediction clipped to [-1, 1], as the discrete samplers' clip_denoised does. Without it
    (the score-SDE reference's arithmetic), where alpha_t is tiny (the start of a cosine schedule)
    an eps error of e moves x0 by e sigma_t / alpha_t."""
    from guided.diffusion.sde import expand_as

    eps = model_fn(x, sde.model_time(t))[:, :x.shape[1]]
    if not clip:
        return eps
    alpha, sigma = (expand_as(v, x) for v in sde.marginal(t))
    x0 = ((x - sigma * eps) / alpha).clamp(-1, 1)
    return (x - alpha * x0) / sigma


def sample_score_family(p: Pipeline, labels, seeds, opts: SampleOptions, *, device="cpu", progress=False,
                        init=None, x_T=None, preview=None) -> torch.Tensor:
    """The score-SDE samplers (Song et al. 2021; Song & Ermon 2019) over the pipeline's score;
    SDEdit (Meng et al. 2022) runs the reverse SDE from t0 with the pc sampler."""
    from guided.samplers import continuous as ss

    device = torch.device(device)
    y = torch.as_tensor(list(labels), device=device, dtype=torch.long)
    noise = SampleNoise(seeds, device)
    score, sde = score_function(p, y, opts)
    if preview is not None:
        score = previewing(score, sde, preview)
    extra = dict(opts.extra)
    steps = score_steps(opts, init)
    if init is not None:
        if not 0 < float(init["t0"]) <= 1:
            raise GuidedError(f"--t0 must be in (0, 1], got {init['t0']}")
        guide = init["image"].to(device).expand(len(y), *init["image"].shape)
        mask = init.get("mask")
        return ss.sdedit(score, sde, guide, steps=steps, t0=float(init["t0"]),
                         mask=None if mask is None else mask.to(device), generator=noise, progress=progress).float()
    if x_T is None:  # the prior: N(0, I), or N(0, sigma_max^2 I) for VE
        x_T = noise.randn(p.shape()) * getattr(sde, "sigma_max", 1.0)
    x_T = x_T.to(device)
    with _autocast(device, opts.precision):
        if opts.sampler == "pc":
            x = ss.pc_sampler(score, sde, x_T, steps=steps, generator=noise, progress=progress, **extra)
        elif opts.sampler == "ode":
            x = ss.ode_sampler(score, sde, x_T, generator=noise, progress=progress, **extra)
        else:
            x = ss.annealed_langevin(score, sde, x_T, sigmas=p.ncsn_sigmas, generator=noise, progress=progress,
                                     **extra)
    return x.float().clamp(-1, 1)


def previewing(score, sde, preview):
    """The score, also reporting at each evaluation the share of [T, eps] done and Tweedie's
    denoised estimate E[x0 | x_t] = (x_t + sigma_t^2 s(x_t, t)) / alpha_t (Efron 2011)."""
    from guided.diffusion.sde import expand_as

    def score_fn(x, t):
        s = score(x, t)
        alpha, sigma = (expand_as(v, x) for v in sde.marginal(t))
        preview(float((sde.T - t[0]) / (sde.T - sde.eps)), (x + sigma**2 * s) / alpha)
        return s
    return score_fn


def score_steps(opts: SampleOptions, init=None) -> Optional[int]:
    """The step count of the pc sampler and of SDEdit (None for ode and langevin, which choose their own)."""
    if opts.sampler in ("ode", "langevin") and init is None:
        return None
    if not str(opts.steps).isdigit() or int(opts.steps) < 1:  # "quad25" and the like are respacings
        raise GuidedError(f"--sampler {opts.sampler} takes a plain step count (e.g. --steps 1000), not {opts.steps!r}")
    return int(opts.steps)


def _sdedit_start(diffusion, init, x_T, noise, kw):
    """SDEdit (Meng et al. 2022): start from the guide noised to t0; with a mask, the
    region outside it is the guide re-noised to each step's level."""
    t0 = float(init["t0"])
    if not 0 < t0 <= 1:
        raise GuidedError(f"--t0 must be in (0, 1], got {t0}")
    guide = init["image"].to(x_T.device).expand_as(x_T)
    start = max(0, min(diffusion.num_timesteps - 1, round(t0 * diffusion.num_timesteps) - 1))
    kw["start_index"] = start
    x = diffusion.q_sample(guide, torch.full((len(x_T),), start, device=x_T.device), x_T)
    mask = init.get("mask")
    if mask is not None:
        mask = mask.to(x_T.device)

        def keep_outside(i, xi):
            if i == 0:
                known = guide
            else:
                known = diffusion.q_sample(guide, torch.full((len(xi),), i - 1, device=xi.device), noise.randn_like(xi))
            return mask * xi + (1 - mask) * known
        kw["after_step"] = keep_outside
    return x


# -- writing outputs ---------------------------------------------------------------------------
def write_output(path: Path, write) -> None:
    """checkpoints.atomic_write, with a failed write (disk full, no permission) turned into one line."""
    try:
        atomic_write(path, write)
    except OSError as e:
        raise GuidedError(f"cannot write {path}: {e.strerror or e}; the previous files are untouched") from None


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The paper's evaluation layout: arr_0 uint8 N x H x W x C, arr_1 the labels."""
    write_output(Path(path), lambda f: np.savez(f, images, labels))


GRID_WIDTH = 20  # a grid wraps a class's samples into rows of at most this many


def save_grid(path: Path, images: np.ndarray, labels: np.ndarray, columns: int = 10, min_cell: int = 64) -> None:
    """grid_image written as a PNG."""
    pil = grid_image(images, labels, columns, min_cell)
    write_output(Path(path), lambda f: pil.save(f, format="PNG"))


def grid_image(images: np.ndarray, labels: np.ndarray, columns: int = 10, min_cell: int = 64):
    """Up to `columns` samples of each class, each class on rows of its own (wrapped at GRID_WIDTH),
    upscaled so small images stay visible (a PIL image)."""
    from PIL import Image

    groups = [images[labels == c][:columns] for c in np.unique(labels)] if len(labels) else [images[:columns]]
    width = min(columns, GRID_WIDTH)
    rows = [g[i:i + width] for g in groups for i in range(0, max(len(g), 1), width)]
    h, w, ch = images.shape[1:]
    zoom = max(1, min_cell // max(h, w))
    grid = np.full((len(rows) * (h + 2), width * (w + 2), ch), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = img
    pil = Image.fromarray(grid[..., 0] if ch == 1 else grid)
    return pil.resize((pil.width * zoom, pil.height * zoom), Image.NEAREST)


CLASS_SAMPLING = ("balanced", "random")


LABEL_CHUNK = 4096  # random class sampling draws the labels of samples in chunks of this many


def labels_of(classes: list[int], idx, sampling: str = "balanced", seed: int = 0) -> np.ndarray:
    """The labels samples `idx` ask for: classes[i % K] ("balanced"), or a class drawn uniformly at
    random with replacement ("random", the paper's sampling scripts), drawn per chunk of LABEL_CHUNK
    samples from (seed, chunk), so any sample's label is found without planning the others and
    the plan is the same at any batch size; an unconditional model gets label -1."""
    if sampling not in CLASS_SAMPLING:
        raise GuidedError(f"class sampling must be one of {', '.join(CLASS_SAMPLING)}, not {sampling!r}")
    idx = np.asarray(idx, dtype=np.int64)
    if not classes:
        return np.full(len(idx), -1, dtype=np.int64)
    if sampling == "balanced":
        return np.asarray(classes, dtype=np.int64)[idx % len(classes)]
    chunks = {c: np.random.default_rng([seed, c]).integers(len(classes), size=LABEL_CHUNK)
              for c in np.unique(idx // LABEL_CHUNK).tolist()}
    return np.asarray(classes, dtype=np.int64)[[chunks[i // LABEL_CHUNK][i % LABEL_CHUNK] for i in idx.tolist()]]


def plan_labels(classes: list[int], num_samples: int, sampling: str = "balanced", seed: int = 0) -> np.ndarray:
    return labels_of(classes, np.arange(num_samples), sampling, seed)


def say(message: str) -> None:
    """A note or warning on stderr, on a line of its own under a progress bar."""
    tqdm.write(message, file=sys.stderr)


def generate(p: Pipeline, out_dir, *, classes: list[int], num_samples: int, batch_size: int, seed: int,
             opts: SampleOptions, device="cpu", overwrite=False, save_pngs=False, init=None,
             rank: int = 0, world_size: int = 1, barrier=None, settings: Optional[dict] = None,
             grid: int = 10, class_sampling: str = "balanced") -> Path:
    """Draw `num_samples` into out_dir/samples.npz, grid.png (`grid` samples per class) and settings.json.

    Batches are saved to out_dir/parts/ as they finish; a rerun with the same
    settings keeps them and draws only what is missing. Rank r of `world_size`
    draws batches r, r + world_size, ...; rank 0 holds the folder's lock and
    assembles the output. Labels and seeds are computed per batch, and the
    output is written batch by batch, so memory does not grow with num_samples.
    """
    out = Path(out_dir)
    if num_samples < 1 or batch_size < 1:
        raise GuidedError("--num-samples and --batch-size must be positive")
    if not 0 <= seed <= 2**63 - num_samples:  # sample i is seeded with seed + i, a 64-bit integer
        raise GuidedError(f"--seed {seed} is out of range: sample i uses seed + i, which must stay below 2**63 "
                          f"(at most {2**63 - num_samples} for {num_samples} samples)")
    labels_of(classes, [], class_sampling)  # an unknown class sampling is refused here
    check_labels(p, classes, opts)
    check_sampler(p, opts.sampler)
    if opts.sampler in SAMPLERS:  # bad steps are refused before any file is written
        create_diffusion(p.diffusion_cfg, str(opts.steps))
    else:
        score_steps(opts, init)
    enforced = bool(classes) and (p.conditional or bool(opts.scale) or bool(opts.x0_scale))
    if classes and not enforced and rank == 0:
        say(f"note: the labels are requests that nothing enforces: {p.name} samples without labels and no "
            f"classifier guides it (--scale 0), so the samples are random draws recorded with the classes asked")
    record = dict(settings or {}, num_samples=num_samples, batch_size=batch_size, seed=seed, classes=classes,
                  class_sampling=class_sampling, labels_enforced=enforced,
                  options=asdict(opts))  # parts/ of another batch size do not fit
    per_sample = int(np.prod(p.shape()))  # bytes of one uint8 image
    lock = first_rank(lambda: _claim(out, record, overwrite, num_samples * per_sample), rank, world_size)
    try:
        if barrier:  # the other ranks start once rank 0 has prepared the folder
            barrier()
        label_fn = lambda idx: labels_of(classes, idx, class_sampling, seed)  # noqa: E731
        _draw(p, out, label_fn, num_samples, batch_size, seed, opts, device, init, rank, world_size)
        if barrier:
            barrier()
        if rank == 0:
            _assemble(out, num_samples, batch_size, record, save_pngs, grid)
    finally:
        if lock is not None:
            lock.release()
    return out / "samples.npz"


def _part(out: Path, start: int) -> Path:
    return out / "parts" / f"batch-{start:08d}.npz"


def _draw(p, out, label_fn, num_samples, batch_size, seed, opts, device, init, rank, world_size) -> None:
    """This rank's batches that parts/ does not hold yet, each saved as it finishes."""
    starts = range(0, num_samples, batch_size)[rank::world_size]
    done = {int(f.name[6:14]) for f in (out / "parts").glob("batch-*.npz")}
    size = lambda s: min(batch_size, num_samples - s)  # noqa: E731
    total = len(starts) * batch_size - (batch_size - size(starts[-1]) if starts else 0)  # no loop over the plan
    bar = tqdm(total=total, initial=sum(size(s) for s in done if s in starts), desc="samples", unit="img",
               disable=rank != 0)
    saturated = []
    try:
        for s in starts:
            if s in done or _part(out, s).exists():
                continue
            idx = np.arange(s, s + size(s))
            labels = label_fn(idx)
            x = sample_batch(p, np.maximum(labels, 0), seed + idx, opts, device=device, init=init, progress=rank == 0)
            images = checked_images(x, s, out, opts, saturated)
            save_npz(_part(out, s), images, labels)
            bar.update(len(idx))
    finally:  # an error message then starts on a line of its own
        bar.close()
    if len(saturated) > 1:
        say(f"warning: {len(saturated)} batches of this run were saturated (batches {saturated[0]}..{saturated[-1]})")


def checked_images(x: torch.Tensor, start: int, out: Path, opts: SampleOptions, saturated: list) -> np.ndarray:
    """uint8 images of a finished batch; non-finite samples are an error (the finished batches
    stay in parts/), a batch with most pixels at 0 or 255 a warning (the first one of a run)."""
    where = f"batch {start} (samples {start}..{start + len(x) - 1})"
    why = f" (is --scale {opts.scale:g} too large?)" if opts.scale else ""
    if not torch.isfinite(x).all():
        kept = len(list((out / "parts").glob("batch-*.npz")))
        raise GuidedError(f"{where} came out NaN or infinite: the sampler diverged{why}; "
                          + (f"the finished batches are kept in {out / 'parts'} ({kept})" if kept else
                             "no batch had finished"))
    images = to_uint8(x)
    extreme = float(np.mean((images == 0) | (images == 255)))
    if extreme > 0.5:
        saturated.append(start)
        if len(saturated) == 1:
            say(f"warning: {where} is saturated: {extreme:.0%} of its pixels are at 0 or 255{why}")
    return images


def _claim(out: Path, record: dict, overwrite: bool, output_bytes: int):
    """Rank 0: check the disk, take the folder's lock, then check and prepare it; the lock is returned."""
    check_room(out, output_bytes)
    lock = lock_folder(out)
    try:
        _prepare_out(out, record, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _prepare_out(out: Path, record: dict, overwrite: bool) -> None:
    if (out / "samples.npz").exists() and not overwrite:
        raise GuidedError(f"{out} already holds samples.npz; pass --overwrite to replace it or choose another --out")
    try:
        (out / "parts").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, disk full
        raise GuidedError(f"cannot use {out} as the output folder: {e.strerror or e}") from None
    plan = out / "parts" / "plan.json"
    text = json.dumps(record, sort_keys=True, default=str)
    if plan.exists() and plan.read_text() != text:
        for f in (out / "parts").glob("batch-*.npz"):  # other settings: earlier batches do not belong
            f.unlink()
    write_output(plan, lambda f: f.write(text.encode()))


def check_room(out: Path, output_bytes: int) -> None:
    """Refuse a run whose batches plus samples.npz cannot fit on the disk of `out`."""
    kept = sum(f.stat().st_size for f in (out / "parts").glob("batch-*.npz"))
    disk = next(d for d in (out, *out.absolute().parents) if d.is_dir())  # out may not exist yet
    need, free = 2 * output_bytes - kept, shutil.disk_usage(disk).free
    if need > free:
        raise GuidedError(f"the samples need about {_size(need)} on disk (the batches in parts/, then samples.npz) "
                          f"but {out} has {_size(free)} free: lower --num-samples or choose another --out")


def _size(n: int) -> str:
    return next(f"{n / 1024**k:.1f} {u}" for k, u in ((4, "TB"), (3, "GB"), (2, "MB"), (0, "bytes"))
                if n >= 1024**k or k == 0)


def _assemble(out: Path, num_samples: int, batch_size: int, record: dict, save_pngs: bool, grid: int) -> None:
    """samples.npz, grid.png, the PNGs and settings.json from parts/, one batch in memory at a time."""
    starts = range(0, num_samples, batch_size)
    write_output(out / "samples.npz", lambda f: _stream_npz(f, out, starts, num_samples))
    shown: dict[int, list] = {}
    for s in starts:
        with np.load(_part(out, s)) as part:
            images, labels = part["arr_0"], part["arr_1"]
        for img, y in zip(images, labels):
            if len(shown.setdefault(int(y), [])) < grid:
                shown[int(y)].append(img)
        if save_pngs:
            _save_pngs(out / "images", s, images, labels)
    if grid > 0:
        ys = sorted(shown)
        save_grid(out / "grid.png", np.stack([i for y in ys for i in shown[y]]),
                  np.array([y for y in ys for _ in shown[y]]), columns=grid)
    write_output(out / "settings.json", lambda f: f.write((json.dumps(record, indent=1, default=str) + "\n").encode()))
    for f in (out / "parts").glob("*"):
        f.unlink()
    (out / "parts").rmdir()


def _stream_npz(f, out: Path, starts: range, n: int) -> None:
    """The paper's npz layout (as np.savez writes it: arr_0 images, arr_1 labels) written one
    batch file at a time, where np.savez would need every sample in memory at once."""
    with np.load(_part(out, 0)) as first:
        shapes = {key: first[key].shape[1:] for key in ("arr_0", "arr_1")}
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, dtype in (("arr_0", np.uint8), ("arr_1", np.int64)):
            with z.open(f"{key}.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                          "shape": (n, *shapes[key])}
                np.lib.format.write_array_header_1_0(member, header)
                for s in starts:
                    with np.load(_part(out, s)) as part:
                        member.write(np.ascontiguousarray(part[key], dtype=dtype).tobytes())


def _save_pngs(folder: Path, start: int, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels), start):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}_class{y}.png")
