"""Latent models (a DiT, or a UNet2DModel on a VAE's latents) through the one guided denoiser.

Random-weight tiny models: a DiTTransformer2DModel (8x8x4 latents, patch 2, two layers, learned sigma) and an
AutoencoderKL (16x16x3 images <-> 8x8x4 latents). Parity: sample_batch and the command line with no extra
flag equal diffusers' own DiTPipeline (DDIM, and DPM-Solver multistep) from the same per-sample latent noise
with classifier-free guidance, within 1 grey level after decoding. DiTPipeline's null label is 1000 whatever
the model (pipeline_dit.py: class_null = [1000] * batch), so the parity model has num_embeds_ada_norm 1000;
ours is num_embeds_ada_norm itself, checked on a 10-class DiT. The guidance terms on latents are checked
against their formulas written directly on the networks, and bad input is one line with exit 2.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,  # noqa: E402
                       DPMSolverMultistepScheduler, UNet2DModel)

from guided.errors import GuidedError  # noqa: E402
from guided.generation import Pipeline, SampleOptions, load_pipeline, sample_batch  # noqa: E402
from guided.generation.images import to_uint8  # noqa: E402
from guided.generation.pipeline import guided_functions  # noqa: E402
from test_diffusers import tiny_classifier  # noqa: E402

DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
           patch_size=2, num_embeds_ada_norm=1000)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
           latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
SHIFTED = dict(VAE, scaling_factor=0.4, shift_factor=0.1)  # DiTPipeline decodes without a shift: the unet's VAE has one
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8)
SEEDS, LABELS = [7, 8], [1, 3]


def made(cls, seed, **kw):
    torch.manual_seed(seed)
    return cls(**kw).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The DiT pipelines (DDIM; DPM-Solver with trailing spacing), a weaker DiT, a latent unet with its vae/, a unet
    folder without one, and a 3-channel VAE."""
    d = tmp_path_factory.mktemp("latent")
    dit, vae = made(DiTTransformer2DModel, 0, **DIT), made(AutoencoderKL, 1, **VAE)
    ddim = DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(clip_sample=False))
    dpm = DiTPipeline(transformer=dit, vae=vae, scheduler=DPMSolverMultistepScheduler(timestep_spacing="trailing"))
    weak = DiTPipeline(transformer=made(DiTTransformer2DModel, 2, **DIT), vae=vae, scheduler=ddim.scheduler)
    for name, pipe in (("dit", ddim), ("dpm", dpm), ("weak", weak)):
        pipe.save_pretrained(d / name)
    unet = made(UNet2DModel, 3, **UNET)
    for sub, part in (("unet", unet), ("vae", made(AutoencoderKL, 1, **SHIFTED)), ("scheduler", DDIMScheduler(clip_sample=False))):
        part.save_pretrained(d / "lunet" / sub)
        if sub != "vae":
            part.save_pretrained(d / "bare" / sub)
    made(AutoencoderKL, 4, **{**VAE, "latent_channels": 3}).save_pretrained(d / "vae3")
    no_vae = d / "novae"
    for sub in ("transformer", "scheduler"):
        getattr(ddim, sub).save_pretrained(no_vae / sub)
    return dict(dir=d, ddim=ddim, dpm=dpm)


def grey_levels(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |difference| in grey levels of 255 between our images in [-1, 1] and a pipeline's in [0, 1]."""
    diff = ((ours / 2 + 0.5).clamp(0, 1) - ref).abs() * 255
    return float(diff.max()), float(diff.mean())


def reference(pipe, steps, scale=4.0, labels=LABELS, seeds=SEEDS):
    return pipe(class_labels=labels, guidance_scale=scale, generator=[torch.Generator().manual_seed(s) for s in seeds],
                num_inference_steps=steps, output_type="pt").images


# -- loading ----------------------------------------------------------------------------------------------------
def test_a_dit_folder_loads_as_a_latent_model(models):
    p = load_pipeline(str(models["dir"] / "dit"), classifier="none")
    cfg = p.model.cfg
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.null_class, cfg.learn_sigma) == (8, 4, 1000, True, True)
    assert p.shape() == (4, 8, 8) and p.image_shape() == (3, 16, 16)
    assert p.score_model.space is p.space and not p.space.bounded
    assert (p.space.scaling_factor, p.space.shift_factor) == (0.5, 0.0)
    assert p.diffusion_cfg.variance == "learned_range" and p.defaults.sampler == "ddim" and p.defaults.steps == "50"


def test_a_latent_unet_loads_with_its_vae_or_with_the_vae_flag(models):
    d = models["dir"]
    a = load_pipeline(str(d / "lunet"), classifier="none")
    b = load_pipeline(str(d / "bare"), classifier="none", vae=str(d / "lunet" / "vae"))
    assert a.shape() == b.shape() == (4, 8, 8) and a.image_shape() == (3, 16, 16)
    assert (a.space.scaling_factor, a.space.shift_factor) == (0.4, 0.1)
    x = torch.rand(3, 3, 16, 16) * 2 - 1  # z = (E(x) - shift) * scaling, D(z / scaling + shift)
    with torch.no_grad():
        z = a.space.encode(x)
        assert torch.allclose(z, (a.space.vae.encode(x).latent_dist.mean - 0.1) * 0.4)
        want = a.space.vae.decode(z / 0.4 + 0.1).sample
        assert torch.allclose(a.space.decode(z), want, atol=1e-6)
        assert torch.allclose(a.space.finish(z), want, atol=1e-6)
    opts = SampleOptions(sampler="ddim", steps="5")
    assert torch.equal(sample_batch(a, [0, 0], SEEDS, opts), sample_batch(b, [0, 0], SEEDS, opts))


@pytest.mark.parametrize("scheduler,variance", [(DDIMScheduler(clip_sample=False), "learned_range"),
                                                (diffusers.DDPMScheduler(clip_sample=False), "fixed_small"),
                                                (DPMSolverMultistepScheduler(), "learned_range")])
def test_a_dit_uses_its_learned_sigma_unless_the_scheduler_declares_a_variance(tmp_path, scheduler, variance):
    DiTPipeline(transformer=made(DiTTransformer2DModel, 0, **DIT), vae=made(AutoencoderKL, 1, **VAE),
                scheduler=scheduler).save_pretrained(tmp_path / "p")
    p = load_pipeline(str(tmp_path / "p"), classifier="none")
    assert p.diffusion_cfg.variance == p.model.variance == variance and p.model.cfg.learn_sigma
    x = sample_batch(p, LABELS, SEEDS, SampleOptions(sampler="ddpm", steps="3"))
    assert torch.isfinite(x).all()


def test_the_null_label_is_num_embeds_ada_norm(tmp_path):
    """On a 10-class DiT the null label is 10: classifier-free guidance equals its formula on the transformer."""
    dit, vae = made(DiTTransformer2DModel, 5, **{**DIT, "num_embeds_ada_norm": 10}), made(AutoencoderKL, 1, **VAE)
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "p")
    p = load_pipeline(str(tmp_path / "p"), classifier="none")
    assert p.num_classes == 10
    x, t, y, w = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([2, 9]), 3.0
    model_fn, _ = guided_functions(p, y, SampleOptions(cfg_scale=w))
    with torch.no_grad():
        got = model_fn(x, t)[:, :4]
        cond = dit(x, timestep=t, class_labels=y).sample[:, :4]
        null = dit(x, timestep=t, class_labels=torch.tensor([10, 10])).sample[:, :4]
    want = null + w * (cond - null)  # Ho & Salimans eq. 6, as DiTPipeline writes it
    assert float((got - want).norm() / want.norm()) < 1e-5


# -- parity with diffusers' DiTPipeline ----------------------------------------------------------------------------
@pytest.mark.parametrize("pipe,sampler,steps", [("ddim", "ddim", "10"), ("dpm", "dpm++", "10"), ("ddim", None, None)])
def test_sample_batch_equals_dit_pipeline(models, pipe, sampler, steps):
    """sampler None: the folder's own default (its scheduler's class, DiTPipeline's 50 steps)."""
    p = load_pipeline(str(models["dir"] / {"ddim": "dit", "dpm": "dpm"}[pipe]), classifier="none")
    ours = sample_batch(p, LABELS, SEEDS, SampleOptions(sampler=sampler, steps=steps, cfg_scale=4.0))
    ref = reference(models[pipe], int(steps or 50))
    worst, mean = grey_levels(ours, ref)
    assert worst < 1.0 and mean < 0.05, (worst, mean)
    assert 0.05 < float(ref.mean()) < 0.95 and float(ref.std()) > 0.05  # not a saturated image


def test_a_folder_naming_transformer2dmodel_loads(tmp_path):
    """The published DiT folders name Transformer2DModel (facebook/DiT-XL-2-256's transformer/config.json)."""
    from diffusers import Transformer2DModel

    net = made(Transformer2DModel, 0, **DIT, norm_type="ada_norm_zero", norm_elementwise_affine=False)
    pipe = DiTPipeline(transformer=net, vae=made(AutoencoderKL, 1, **VAE), scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    p = load_pipeline(str(tmp_path / "p"), classifier="none")
    ours = sample_batch(p, LABELS, SEEDS, SampleOptions(sampler="ddim", steps="5", cfg_scale=4.0))
    assert grey_levels(ours, reference(pipe, 5))[0] < 1.0


def test_the_command_line_equals_dit_pipeline(models, tmp_path):
    """No flag beyond the guidance scale: the written uint8 (the paper's truncation) against DiTPipeline's PIL
    output (rounded) at its defaults (50 steps), within 1 grey level; settings.json names the VAE."""
    from guided.cli.sample import main as sample_main

    folder = str(models["dir"] / "dit")
    assert sample_main(["--model", folder, "--class", "1,3", "--cfg-scale", "4", "--num-samples", "2", "--seed", "7",
                        "--out", str(tmp_path / "o")]) == 0
    with np.load(tmp_path / "o" / "samples.npz") as f:
        ours, labels = f["arr_0"].astype(int), f["arr_1"]
    assert labels.tolist() == LABELS
    ref = np.round(reference(models["ddim"], 50).permute(0, 2, 3, 1).numpy() * 255).astype(int)  # numpy_to_pil
    assert ours.shape == (2, 16, 16, 3) and np.abs(ours - ref).max() <= 1
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["vae"] == folder and settings["options"]["sampler"] == "ddim" and settings["options"]["clip"] == "none"


# -- every sampler and guidance term ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guided_pipeline(models):
    d = models["dir"]
    loaded = load_pipeline(str(d / "dit"), classifier="none", autoguide=str(d / "weak"), guides=("autoguide",))
    torch.manual_seed(0)
    return Pipeline(loaded.model, loaded.diffusion_cfg, tiny_classifier(8, 4), weak_model=loaded.weak_model,
                    x0_classifier=tiny_classifier(16, 3), space=loaded.space)


@pytest.mark.parametrize("sampler,steps", [("ddpm", "4"), ("ddim", "4"), ("dpm++", "4"), ("dpm++2m-sde", "4"),
                                           ("dpm++3m", "4"), ("edm", "4"), ("pc", "3"), ("ode", None)])
def test_every_sampler_and_guidance_term_runs_on_a_latent_model(guided_pipeline, sampler, steps):
    p = guided_pipeline
    settings = {"rtol": 1e-2, "atol": 1e-2} if sampler == "ode" else {}
    opts = SampleOptions(sampler=sampler, steps=steps, scale=2.0, cfg_scale=2.0, cfg_interval=(0.1, 50.0),
                         autoguide_scale=1.5, x0_scale=1.0, settings=settings)
    x = sample_batch(p, LABELS, [0, 1], opts)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    plain = sample_batch(p, LABELS, [0, 1], SampleOptions(sampler=sampler, steps=steps, settings=settings))
    assert not torch.allclose(x, plain)


def test_the_latent_gradient_terms_equal_their_formulas(guided_pipeline):
    """classifier: s grad_z log p(y | z_t, t); x0-classifier: s grad_z log p(y | D(x0_hat(z_t))), through the decoder."""
    p = guided_pipeline
    x, t, y, s = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([400, 400]), \
        torch.tensor(LABELS), 2.0
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32).double(), 0)[400].float()
    for opts, classify in ((SampleOptions(scale=s), lambda z: p.classifier(z, t)),
                           (SampleOptions(scale=0.0, x0_scale=s), None)):
        _, cond_fn = guided_functions(p, y, opts)
        with torch.enable_grad():
            z = x.clone().requires_grad_(True)
            if classify is not None:
                logits = classify(z)
            else:  # Ho et al. eq. 15 on the DiT's eps, decoded as D(z / scaling)
                x0 = (z - (1 - abar).sqrt() * p.model.transformer(z, timestep=t, class_labels=y).sample[:, :4]) / abar.sqrt()
                image = p.space.vae.decode(x0 / 0.5).sample  # the DiT folder's VAE: scaling 0.5, no shift
                logits = p.x0_classifier(image, torch.zeros(2, dtype=torch.long))
            want = s * torch.autograd.grad(F.log_softmax(logits, -1)[torch.arange(2), y].sum(), z)[0]
        got = cond_fn(x, t)
        assert float(want.norm()) > 1e-6 and float((got - want).norm() / want.norm()) < 1e-5


def test_sdedit_encodes_the_guide(guided_pipeline):
    p, image = guided_pipeline, torch.rand(3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 16, 16)
    mask[:, :8] = 1
    from guided.generation.loading import _to_space
    init = {"image": _to_space(p, image), "t0": 0.5, "mask": _to_space(p, mask, mask=True)}
    assert init["image"].shape == (4, 8, 8) and init["mask"].shape == (1, 8, 8) and init["mask"][0, :4].all()
    x = sample_batch(p, LABELS, [0, 1], SampleOptions(sampler="ddim", steps="6"), init=init)
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_latent_input_is_one_line(models, tmp_path, capsys):
    from fault_harness import one_error_line
    from guided.cli.sample import main as sample_main

    d = models["dir"]
    cases = [
        ("a DiT folder without its VAE", ["--model", str(d / "novae")], "the folder has no vae/: give its VAE with --vae"),
        ("a VAE whose latent channels do not match", ["--model", str(d / "bare"), "--vae", str(d / "vae3")],
         "makes 3-channel latents but the network takes 4 channels"),
        ("--vae on a pixel model", ["--model", "cond", "--vae", str(d / "vae3")], "is a pixel model"),
        ("a pixel classifier as a latent model's --classifier",
         ["--model", str(d / "dit"), "--classifier", "classifier", "--scale", "1"],
         "a pixel classifier guides a latent model as --x0-classifier"),
        ("--clip static on a latent model", ["--model", str(d / "dit"), "--clip", "static"], "has no range to clip"),
    ]
    for given, argv, expected in cases:
        capsys.readouterr()
        try:
            code = sample_main(argv + ["--out", str(tmp_path / "o"), "--num-samples", "2", "--steps", "2",
                                       "--class", "1"])
        except SystemExit as e:
            code = e.code
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and expected in line, (given, line)


def test_a_latent_classifier_on_a_pixel_model_is_refused(models):
    from test_diffusers import TINY
    from guided.networks.diffusers import load_network

    pixel = models["dir"] / "pixel"
    made(UNet2DModel, 0, **{**TINY, "in_channels": 4, "out_channels": 4}).save_pretrained(pixel / "unet")
    DDIMScheduler().save_pretrained(pixel / "scheduler")
    net, values = load_network(pixel)
    from guided.config import DiffusionConfig, node
    with pytest.raises(GuidedError, match="the classifier takes 8x8x3 images but the score model makes 8x8x4"):
        Pipeline(net, node(DiffusionConfig, values), tiny_classifier(8, 3))


# -- the x0-classifier through the decoder against an exact oracle ------------------------------------------
class LinearVAE(torch.nn.Module):
    """A decoder that is a rotation A of the unscaled latents: D(z / s + shift) = A z for the LatentSpace below."""

    def __init__(self, rotation, scaling, shift):
        super().__init__()
        from types import SimpleNamespace
        self.A = torch.nn.Parameter(rotation, requires_grad=False)
        self.scaling, self.shift = scaling, shift
        self.config = SimpleNamespace(latent_channels=2, out_channels=2, block_out_channels=(8,))

    def decode(self, u):
        from types import SimpleNamespace
        z = ((u - self.shift) * self.scaling).flatten(1)
        return SimpleNamespace(sample=(z @ self.A.T).reshape(u.shape))


def test_x0_classifier_through_a_linear_decoder_is_the_latent_posterior():
    """A latent Gaussian mixture decoded by a rotation is a pixel mixture with the rotated means and the
    same isotropic variances, so the pixel classifier of the decoded x0 estimate is exactly the latent
    classifier of the latent x0 estimate: the guidance gradient through the decoder (and the latent
    space's scaling and shift) must equal the one taken on latents directly."""
    from guided.diffusion.space import LatentSpace
    from mixture_nets import MEANS, MixtureClassifier, MixtureEps
    from test_guidance_layer import ABAR, DIFF

    angle = torch.tensor(0.7)
    rotation = torch.tensor([[angle.cos(), -angle.sin()], [angle.sin(), angle.cos()]])
    space = LatentSpace(vae=LinearVAE(rotation, 0.5, 0.1), scaling_factor=0.5, shift_factor=0.1, source="linear")
    through = Pipeline(MixtureEps(ABAR), DIFF, x0_classifier=MixtureClassifier(ABAR, means=MEANS @ rotation.T),
                       space=space)
    direct = Pipeline(MixtureEps(ABAR), DIFF, x0_classifier=MixtureClassifier(ABAR))
    y, opts = torch.tensor([0, 1, 1, 0]), SampleOptions(x0_scale=2.0, x0_temperature=30.0)  # soft logits
    between = MEANS.mean(0).view(1, 2, 1, 1)  # where the posterior is not yet saturated
    for t in (10, 300, 800):
        abar = float(ABAR[t])
        x = abar**0.5 * between + 0.1 * torch.randn(4, 2, 1, 1, generator=torch.Generator().manual_seed(t))
        tt = torch.full((4,), t)
        g_through = guided_functions(through, y, opts)[1](x, tt)
        g_direct = guided_functions(direct, y, opts)[1](x, tt)
        assert g_direct.abs().max() > 1e-3, (t, g_direct)  # the term acts
        assert torch.allclose(g_through, g_direct, rtol=1e-4, atol=1e-6), (t, g_through, g_direct)
