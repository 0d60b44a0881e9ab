"""A diffusers UNet2DModel guided through the project's one model interface (guided/networks/diffusers.py).

Parity with diffusers' own pipelines: a random-weight UNet2DModel of the published CIFAR-10 DDPM unet
layout (google/ddpm-cifar10-32: DownBlock2D, AttnDownBlock2D, DownBlock2D, DownBlock2D, two layers per
block) with its channels reduced from (128, 256, 256, 256) to (32, 64, 64, 64) for the CPU (one full-width
run checks the published size), eps and v_prediction, unguided DDPM and DDIM (eta 0 and 1) from the same
per-sample noise, against DDPMPipeline / DDIMPipeline to 1e-4 relative; the classifier-guided step on the
adapted model against the paper's formulas written directly on the diffusers unet, to 1e-5.
Skipped only where diffusers is not installed (CI installs the extra).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from guided.config import ClassifierConfig, node  # noqa: E402
from guided.diffusion import scheduler_config as sc  # noqa: E402
from guided.diffusion.gaussian import space_timesteps  # noqa: E402
from guided.errors import GuidedError  # noqa: E402
from guided.generation import Pipeline, SampleOptions, load_pipeline, sample_batch  # noqa: E402
from guided.generation.pipeline import guided_functions  # noqa: E402
from guided.networks.unet import EncoderUNetModel  # noqa: E402
from guided.samplers import discrete  # noqa: E402

CIFAR_UNET = dict(  # google/ddpm-cifar10-32 unet/config.json, channels aside
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1,
    downsample_padding=0, norm_eps=1e-6, norm_num_groups=32, act_fn="silu", attention_head_dim=None)
SMALL = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8)
SEEDS = [11, 12]


def cifar_unet(seed=0, **changes) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**CIFAR_UNET, **SMALL, **changes}).eval()


def save(tmp_path, unet, scheduler, name="pipe"):
    folder = tmp_path / name
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours = (ours / 2 + 0.5).clamp(0, 1)  # the pipelines' output mapping
    return float((ours - ref).norm() / ref.norm())


def generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


# -- the schedule: betas and spacings as diffusers builds them --------------------------------------------
@pytest.mark.parametrize("kw", [dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012), dict(beta_schedule="squaredcos_cap_v2"),
                                dict(trained_betas=np.linspace(1e-4, 0.03, 200).tolist(), num_train_timesteps=200)])
def test_betas_equal_the_schedulers(kw):
    ref = DDPMScheduler(**kw)
    b = sc.betas(sc.check(dict(ref.config), "test"))
    assert np.array_equal(b.astype(np.float32), ref.betas.numpy())
    assert np.allclose(np.cumprod(1 - b), ref.alphas_cumprod.numpy().astype(np.float64), rtol=1e-5)


@pytest.mark.parametrize("spacing,offset,n", [("leading", 0, 50), ("leading", 1, 50), ("leading", 1, 7),
                                              ("trailing", 0, 50), ("trailing", 0, 7), ("linspace", 0, 50),
                                              ("linspace", 0, 7)])
def test_spacings_equal_set_timesteps(spacing, offset, n):
    s = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    s.set_timesteps(n)
    assert space_timesteps(1000, f"{spacing}{n}", offset) == sorted(s.timesteps.tolist())


# -- parity with diffusers' pipelines ----------------------------------------------------------------------
@pytest.mark.parametrize("prediction,variance,spacing,offset", [
    ("epsilon", "fixed_large", "leading", 0), ("epsilon", "fixed_small", "leading", 1),
    ("v_prediction", "fixed_large", "leading", 0), ("v_prediction", "fixed_small", "trailing", 0),
    ("v_prediction", "fixed_small", "linspace", 0), ("sample", "fixed_small", "leading", 0),
    ("epsilon", "learned_range", "leading", 0)])
def test_ddpm_equals_ddpm_pipeline(tmp_path, prediction, variance, spacing, offset):
    """Where the last kept timestep is not 0 (trailing; leading with steps_offset), DDPMScheduler adds noise of
    variance beta at the last step when the variance is fixed_large; the paper's sampler ends on the mean there
    (with fixed_small that variance is 0 and both agree), so those pairs are compared with fixed_small."""
    learned = variance == "learned_range"
    unet = cifar_unet(out_channels=6 if learned else 3)
    sched = DDPMScheduler(variance_type=variance, prediction_type=prediction, timestep_spacing=spacing,
                          steps_offset=offset)
    p = load_pipeline(str(save(tmp_path, unet, sched)), classifier="none")
    ours = sample_batch(p, [0, 0], SEEDS, SampleOptions(sampler="ddpm", steps="10"))
    ref = DDPMPipeline(unet=unet, scheduler=sched)(batch_size=2, generator=generators(), num_inference_steps=10,
                                                   output_type="pt").images
    assert relative(ours, ref) < 1e-4


@pytest.mark.parametrize("prediction,eta,spacing,offset,eps,clip", [
    ("epsilon", 0.0, "leading", 0, None, True), ("epsilon", 1.0, "leading", 1, None, True),
    ("v_prediction", 0.0, "trailing", 0, None, True), ("epsilon", 0.0, "leading", 0, None, False),
    ("epsilon", 0.0, "leading", 0, "clipped", True), ("epsilon", 1.0, "leading", 1, "clipped", True),
    ("v_prediction", 0.0, "trailing", 0, "clipped", True), ("v_prediction", 1.0, "leading", 0, "clipped", True)])
def test_ddim_equals_ddim_pipeline(tmp_path, prediction, eta, spacing, offset, eps, clip):
    """With no setting, a diffusers folder's DDIM is DDIMPipeline's default call: x0 clipped as the scheduler's
    clip_sample says, the step on the network's eps (use_clipped_model_output=False); eps=clipped is the paper's
    DDIM, eps re-derived from the clipped x0 (use_clipped_model_output=True). On this random-weight unet the two
    differ by up to 255 grey levels, so each comparison tells them apart."""
    unet = cifar_unet(seed=1)
    sched = DDIMScheduler(prediction_type=prediction, timestep_spacing=spacing, steps_offset=offset, clip_sample=clip)
    p = load_pipeline(str(save(tmp_path, unet, sched)), classifier="none")
    settings = {"eta": eta, **({} if eps is None else {"eps": eps})}
    ours = sample_batch(p, [0, 0], SEEDS, SampleOptions(sampler="ddim", steps="10", settings=settings))
    ref = DDIMPipeline(unet=unet, scheduler=sched)(batch_size=2, generator=generators(), num_inference_steps=10,
                                                   eta=eta, use_clipped_model_output=eps == "clipped",
                                                   output_type="pt").images
    assert relative(ours, ref) < 1e-4


def test_the_published_width_equals_ddpm_pipeline(tmp_path):
    unet = cifar_unet(seed=2, block_out_channels=(128, 256, 256, 256), norm_num_groups=32)
    sched = DDPMScheduler(variance_type="fixed_large")  # google/ddpm-cifar10-32's scheduler
    p = load_pipeline(str(save(tmp_path, unet, sched)), classifier="none")
    ours = sample_batch(p, [0, 0], SEEDS, SampleOptions(sampler="ddpm", steps="4"))
    ref = DDPMPipeline(unet=unet, scheduler=sched)(batch_size=2, generator=generators(), num_inference_steps=4,
                                                   output_type="pt").images
    assert relative(ours, ref) < 1e-4


# -- the classifier-guided step, written directly on the diffusers unet -----------------------------------
def tiny_classifier(size=32, channels=3):
    torch.manual_seed(5)
    net = EncoderUNetModel(node(ClassifierConfig, dict(
        image_size=size, in_channels=channels, model_channels=32, num_res_blocks=1, channel_mult=[1, 1],
        attention_resolutions=[], num_head_channels=-1, num_heads=1, pool="adaptive", num_classes=10))).eval()
    with torch.no_grad():  # the zero-initialised output layers, made random: a classifier with a gradient
        for prm in net.parameters():
            if not prm.any():
                prm.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_guided_steps_equal_the_formulas_on_the_unet(tmp_path, prediction):
    unet, clf = cifar_unet(seed=3), tiny_classifier()
    sched = DDPMScheduler(variance_type="fixed_large", prediction_type=prediction)
    loaded = load_pipeline(str(save(tmp_path, unet, sched)), classifier="none")
    p = Pipeline(loaded.model, loaded.diffusion_cfg, clf)
    s, y, i = 3.0, torch.tensor([2, 7]), 5  # respaced index 5 of leading10: t = 500, previous 400
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model_fn, cond_fn = guided_functions(p, y, SampleOptions(scale=s, clip="none"))
    diffusion = p.score_model.process("10")
    with torch.no_grad():  # the gradient term takes its own
        mean = discrete.guided_p_mean_variance(diffusion, model_fn, x, i, cond_fn=cond_fn, clip_denoised=False)[0]
        ddim = discrete.ddim_step(diffusion, model_fn, x, i, cond_fn=cond_fn, clip_denoised=False)[0]
    mean = mean["mean"]

    t, t_prev = torch.tensor([500, 500]), 400
    abar, abar_prev = sched.alphas_cumprod[500], sched.alphas_cumprod[t_prev]
    with torch.no_grad():
        out = unet(x, t).sample
    eps = out if prediction == "epsilon" else abar.sqrt() * out + (1 - abar).sqrt() * x
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        logp = F.log_softmax(clf(xg, t), -1)[torch.arange(2), y].sum()
        grad = s * torch.autograd.grad(logp, xg)[0]
    beta = 1 - abar / abar_prev
    x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()  # Ho et al. eq. 15
    mu = abar_prev.sqrt() * beta / (1 - abar) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * x  # eq. 7
    want_mean = mu + beta * grad  # Algorithm 1, Sigma = beta_t (fixed_large)
    eps_hat = eps - (1 - abar).sqrt() * grad  # Algorithm 2
    x0_hat = (x - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
    want_ddim = abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps_hat
    assert float((mean - want_mean).norm() / want_mean.norm()) < 1e-5
    assert float((ddim - want_ddim).norm() / want_ddim.norm()) < 1e-5
    assert float((want_mean - mu).norm()) > 1e-3  # the guidance moved it


# -- every sampler and guidance term on it ------------------------------------------------------------------
TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    main = save(d, UNet2DModel(**TINY), DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"), "main")
    weak = save(d, UNet2DModel(**TINY), DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction"), "weak")
    return main, weak, tiny_classifier(8, 1)


@pytest.mark.parametrize("sampler,steps", [("ddpm", "5"), ("ddim", "5"), ("dpm++", "5"), ("pc", "4"), ("ode", None)])
def test_every_sampler_and_guidance_term_runs_on_it(tiny_pair, sampler, steps):
    main, weak, clf = tiny_pair
    loaded = load_pipeline(str(main), classifier="none", autoguide=str(weak), guides=("autoguide",))
    p = Pipeline(loaded.model, loaded.diffusion_cfg, clf, weak_model=loaded.weak_model, x0_classifier=clf)
    opts = SampleOptions(sampler=sampler, steps=steps, scale=2.0, interval=(0.1, 50.0), autoguide_scale=1.5,
                         x0_scale=1.0, settings={"rtol": 1e-2, "atol": 1e-2} if sampler == "ode" else {})
    x = sample_batch(p, [1, 3], [0, 1], opts)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    plain = sample_batch(p, [1, 3], [0, 1], SampleOptions(sampler=sampler, steps=steps, settings=opts.settings))
    assert not torch.allclose(x, plain)


def test_classifier_free_guidance_on_a_null_class_unet(tmp_path):
    from guided.networks.diffusers import DiffusersUNet

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY, num_class_embeds=11).eval()  # ten classes and the null class
    net = DiffusersUNet(unet, DDPMScheduler(num_train_timesteps=100).alphas_cumprod, null_class=True)
    from guided.diffusion.scheduler_config import diffusion_values
    folder = save(tmp_path, unet, DDPMScheduler(num_train_timesteps=100))
    cfg = node_of(diffusion_values(folder, sc.read(folder)))
    p = Pipeline(net, cfg)
    assert p.num_classes == 10
    a = sample_batch(p, [1, 3], [0, 1], SampleOptions(sampler="ddim", steps="5", cfg_scale=3.0))
    b = sample_batch(p, [1, 3], [0, 1], SampleOptions(sampler="ddim", steps="5"))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def node_of(values):
    from guided.config import DiffusionConfig
    return node(DiffusionConfig, values)


# -- bad input ------------------------------------------------------------------------------------------------
def test_bad_folders_and_schedulers_are_one_line(tmp_path, tiny_pair):
    main, _, _ = tiny_pair
    (tmp_path / "junk" / "unet").mkdir(parents=True)
    with pytest.raises(GuidedError, match="is not a diffusers model"):
        load_pipeline(str(tmp_path / "junk"), classifier="none")
    for key, value, match in (("prediction_type", "flow", "prediction_type 'flow' is not supported"),
                              ("beta_schedule", "sigmoid", "beta_schedule 'sigmoid' is not supported")):
        bad = tmp_path / key
        bad.mkdir()
        cfg = json.loads((main / "scheduler" / "scheduler_config.json").read_text())
        (bad / "scheduler_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(GuidedError, match=match):
            load_pipeline(str(main / "unet"), classifier="none", scheduler=str(bad / "scheduler_config.json"))


def test_a_unet_folder_needs_its_scheduler(tiny_pair):
    main, _, _ = tiny_pair
    with pytest.raises(GuidedError, match="name the scheduler config"):
        load_pipeline(str(main / "unet"), classifier="none")
    p = load_pipeline(str(main / "unet"), classifier="none", scheduler=str(main / "scheduler"))
    assert p.score_model.base.num_timesteps == 100


@pytest.fixture(scope="module")
def classifier_run(tiny_pair, tmp_path_factory):
    """train_classifier.py for the tiny diffusers model's chain: diffusion.betas_from names its folder."""
    from conftest import TINY_CLASSIFIER, TINY_TRAIN
    from guided.cli.train import main_classifier

    main, _, _ = tiny_pair
    out = tmp_path_factory.mktemp("clf") / "run"
    argv = TINY_CLASSIFIER + TINY_TRAIN + ["train.steps=2", "train.eval_images=8", "train.calibration_bands=0",
                                           f"diffusion.betas_from={main}", f"train.out_dir={out}"]
    assert main_classifier(argv) in (0, None)
    return out


def test_the_classifier_trains_on_the_schedulers_chain(tiny_pair, classifier_run):
    from guided.config import load_config
    from guided.diffusion.gaussian import create_diffusion

    main, _, _ = tiny_pair
    cfg = load_config(classifier_run / "config.yaml")
    assert cfg.diffusion.betas_from == str(main)
    ref = DDPMScheduler.from_pretrained(str(main / "scheduler"))
    chain = create_diffusion(cfg.diffusion, "")
    assert np.allclose(chain.alphas_cumprod.numpy(), ref.alphas_cumprod.numpy(), rtol=1e-5)
    with pytest.raises(GuidedError, match="diffusion.steps=1000 but the scheduler config"):
        create_diffusion(node_of({"steps": 1000, "betas_from": str(main)}))


def test_cli_refusals_are_one_line(tiny_pair, classifier_run, tmp_path, capsys):
    from fault_harness import one_error_line, record_bad_input
    from guided.cli.sample import main as sample_main

    main, _, _ = tiny_pair
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model_index.json").write_text("{}")
    cfg = json.loads((main / "scheduler" / "scheduler_config.json").read_text())
    for key, value in (("prediction_type", "flow"), ("beta_schedule", "sigmoid")):
        (tmp_path / f"{key}.json").write_text(json.dumps({**cfg, key: value}))
    unet = ["--model", str(main / "unet"), "--scheduler"]
    big = save(tmp_path, UNet2DModel(**{**TINY, "sample_size": 16}), DDPMScheduler(num_train_timesteps=100), "big")
    cases = [
        ("--model a folder that is not a diffusers model", ["--model", str(tmp_path / "junk")],
         "is not a diffusers model: no unet/config.json"),
        ("--scheduler with prediction_type flow", unet + [str(tmp_path / "prediction_type.json")],
         "prediction_type 'flow' is not supported; one of epsilon, v_prediction, sample"),
        ("--scheduler with beta_schedule sigmoid", unet + [str(tmp_path / "beta_schedule.json")],
         "beta_schedule 'sigmoid' is not supported"),
        ("--class 3 to an unconditional diffusers unet without --classifier",
         ["--model", str(main), "--classifier", "none", "--class", "3"], "--class needs a class-conditional model"),
        ("--classifier for 8x8 images with a 16x16 diffusers unet",
         ["--model", str(big), "--classifier", str(classifier_run), "--class", "3", "--scale", "1"],
         "the classifier takes 8x8x1 images but the score model makes 16x16x1"),
    ]
    for given, argv, expected in cases:
        capsys.readouterr()
        try:
            code = sample_main(argv + ["--out", str(tmp_path / "o"), "--num-samples", "2", "--steps", "2"])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert "error: " in err, given
        line = one_error_line(err)
        assert code == 2 and expected in line, line
        record_bad_input(f"sample_guided.py {given}", "sample_guided.py", given, code,
                         line.replace(str(tmp_path), "…").replace(str(main), "…/tiny"))


def test_a_mismatched_classifier_is_one_line(tiny_pair):
    main, _, _ = tiny_pair
    loaded = load_pipeline(str(main), classifier="none")
    with pytest.raises(GuidedError, match="takes 32x32x3 images but the score model makes 8x8x1"):
        Pipeline(loaded.model, loaded.diffusion_cfg, tiny_classifier())


@pytest.mark.parametrize("scheduler,clips", [(DDPMScheduler(), True), (DDIMScheduler(clip_sample=False), False),
                                             (diffusers.DPMSolverMultistepScheduler(), False)])
def test_a_pixel_folder_clips_as_its_scheduler_does(tmp_path, scheduler, clips):
    """clip_sample where the class has it (DDPM/DDIM, default True); none for a class without it (DPM-Solver)."""
    p = load_pipeline(str(save(tmp_path, cifar_unet(), scheduler)), classifier="none")
    assert p.defaults.clip == ("static" if clips else "none")
    assert p.sampler_defaults == {"ddim": {"eps": "model"}}
