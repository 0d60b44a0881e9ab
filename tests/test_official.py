"""Official ADM checkpoints through the application: the paper's arithmetic by default, presets by
file name, warnings on flags that differ from them, messages that say what to do, and parity of
the sample CLI's own path with the reference's guided DDIM loop (../shared/conformance/guided_a.pt)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from guided.networks import adm
from guided.cli.options import options, pipeline_keywords
from guided.cli.sample import build_parser, main
from guided.evaluation.conformance import LOOP_TOL, TOL, rel_error
from guided.generation import load_pipeline as load, sample_batch, to_uint8
import dataclasses

from guided.config import SamplingConfig
from guided.generation.pipeline import guided_denoiser
from guided.generation.resolve import resolve
from guided.samplers.levels import make_levels
from guided.samplers.noise import SampleNoise


def load_pipeline(args, device):
    return load(**pipeline_keywords(args, device))


def discrete_sampler(p, labels, opts, noise):
    """(diffusion, model_fn, keywords) of one discrete step, as the registry's entries run it."""
    opts = resolve(p, opts)
    den = guided_denoiser(p, torch.as_tensor(labels), opts)
    chain = make_levels(p.score_model, "chain", opts.steps).chain
    kw = dict(noise=noise, cond_fn=den.grad, clip_denoised=den.clips, clip_guided=den.clip_guided, clip_fn=den.clip_x0)
    form = opts.settings.get("ddpm_form")
    return chain, den.output, {**kw, **({"guidance_form": form} if form else {"eta": opts.settings.get("eta", 0.0)})}


def score_function(p, y, opts):
    return guided_denoiser(p, y, resolve(p, opts)).score(), p.score_model.sde
from guided.samplers.discrete import ddim_step, ddpm_step

GUIDED_A = Path(__file__).resolve().parents[1] / ".." / "shared" / "conformance" / "guided_a.pt"
TINY_UNET = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 4 "
             "--num_head_channels 16 --class_cond True --num_classes 3 --learn_sigma True --noise_schedule cosine "
             "--use_new_attention_order True")
TINY_CLASSIFIER = ("--image_size 8 --classifier_width 32 --classifier_depth 1 --channel_mult 1,2 "
                   "--classifier_attention_resolutions 4 --num_head_channels 16 --num_classes 3")


def run(capsys, *argv):
    """(exit code, stdout, stderr without progress bars)."""
    try:  # argparse errors exit from inside main, the rest return
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith(("note:", "warning:", "error:"))]
    return code, out.out, "\n".join(lines)


def flag_string(flags: dict) -> str:
    return " ".join(f"--{k} {v}" for k, v in flags.items())


def save_random(build, flags, path, seed=0):
    """A network of `flags` with random, non-zero weights everywhere, saved as a bare state dict."""
    torch.manual_seed(seed)
    net = build(flags)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save(net.state_dict(), path)
    return path


# -- 1. the extra clip: off (the paper's arithmetic) except for the shipped cosine digits models ---------
@pytest.mark.parametrize("model, argv, expected", [
    ("cond", ["--sampler", "ddim"], True),
    ("uncond", ["--sampler", "dpm++"], True),
    ("uncond", ["--sampler", "pc"], True),
    ("uncond", ["--sampler", "ddpm"], False),  # guidance shifts the mean: nothing to clip again
    ("uncond", ["--sampler", "ddim", "--no-clip"], False),
    ("ncsn", ["--sampler", "pc"], False),
    ("cond", ["--sampler", "ddim", "--no-clip-guided"], False),
    ("other", ["--sampler", "ddim"], False),  # a model whose config sets no sampling defaults
    ("other", ["--sampler", "ode"], False),
    ("other", ["--sampler", "dpm++", "--clip-guided"], True),
])
def test_clip_guided_default_per_model(model, argv, expected):
    """Decided once, after loading, from the model's own config (its sampling node), else off."""
    p = load("uncond" if model == "other" else model)
    if model == "other":
        p = dataclasses.replace(p, defaults=SamplingConfig())
    assert resolve(p, options(build_parser().parse_args(argv), 4.0)).clip_guided is expected


@pytest.mark.parametrize("argv, message", [
    (["--clip-guided", "--no-clip", "--sampler", "ddim"], "--clip-guided clips x0 to the data range; it cannot go"),
    (["--clip-guided", "--sampler", "ddpm"], "--clip-guided does not change the ddpm sampler"),
])
def test_clip_guided_that_cannot_apply_is_refused(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *argv, "--out", tmp_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_settings_record_the_clip_and_it_changes_the_samples(tmp_path, capsys):
    """The shipped unconditional model turns the clip on by itself; --no-clip-guided samples the
    paper's way, and the two differ on guided DDIM (abar_T = 2e-9 in its cosine schedule)."""
    images = {}
    for flag in ("", "--no-clip-guided"):
        out = tmp_path / (flag or "default")
        code, _, _ = run(capsys, "--model", "uncond", "--class", 7, "--scale", 4, "--sampler", "ddim", "--steps", 3,
                         "--num-samples", 2, "--out", out, *([flag] if flag else []))
        assert code == 0
        settings = json.loads((out / "settings.json").read_text())
        assert settings["options"]["clip_guided"] is (flag == "")
        images[flag] = np.load(out / "samples.npz")["arr_0"]
    assert np.abs(images[""].astype(int) - images["--no-clip-guided"].astype(int)).max() > 10


def test_score_samplers_take_the_network_eps_unless_clip_guided():
    """pc and ode: s = -eps / sigma from the raw eps (the score-SDE reference); the clip re-derives
    eps from the clipped x0, which moves it only where x0 leaves [-1, 1]."""
    from guided.generation import SampleOptions
    from test_generate import tiny_pipeline

    p = tiny_pipeline()
    y = torch.tensor([0, 1])
    x, t = torch.randn(2, 3, 8, 8) * 3, torch.full((2,), 0.9)
    paper, sde = score_function(p, y, SampleOptions(sampler="pc"))
    clipped, _ = score_function(p, y, SampleOptions(sampler="pc", clip_guided=True))
    with torch.no_grad():
        eps = p.model(x, sde.model_time(t))[:, :3]  # an unconditional model
        sigma = sde.marginal(t)[1].view(-1, 1, 1, 1)
        assert torch.allclose(paper(x, t), -eps / sigma, rtol=1e-5, atol=1e-6)
        assert (paper(x, t) - clipped(x, t)).abs().max() > 1e-2


# -- 2. released file names: their published flags, and a warning for each flag that differs -----------
@pytest.fixture()
def released(tmp_path, monkeypatch):
    """Tiny stand-ins saved under two released names, whose presets are swapped for tiny ones
    (the real presets' keys and shapes are checked against the manifest in test_adm.py)."""
    monkeypatch.setitem(adm.PUBLISHED, "64x64_diffusion.pt", TINY_UNET)
    monkeypatch.setitem(adm.PUBLISHED, "64x64_classifier.pt", TINY_CLASSIFIER)
    save_random(adm.create_model, TINY_UNET, tmp_path / "64x64_diffusion.pt")
    save_random(adm.create_classifier, TINY_CLASSIFIER, tmp_path / "64x64_classifier.pt", seed=1)
    return tmp_path


def test_released_names_need_no_flags(released, capsys):
    argv = ["--model", released / "64x64_diffusion.pt", "--classifier", released / "64x64_classifier.pt",
            "--class", "1,2", "--scale", "2", "--sampler", "ddim", "--steps", "3", "--num-samples", "2"]
    code, out, err = run(capsys, *argv, "--out", released / "out")
    assert code == 0, err
    notes = [n for n in err.strip().splitlines() if "looks ruined" not in n]  # random weights: ruined images
    assert len(notes) == 2 and all(n.startswith("note: ") for n in notes), err
    assert "no --adm-flags given, using the published flags of the released 64x64_diffusion.pt" in notes[0]
    assert "no --classifier-flags given, using the published flags of the released 64x64_classifier.pt" in notes[1]
    args = build_parser().parse_args([str(a) for a in argv])
    p = load_pipeline(args, "cpu")
    assert p.model.cfg == adm.unet_config(TINY_UNET) and p.classifier.cfg == adm.classifier_config(TINY_CLASSIFIER)
    assert p.diffusion_cfg == adm.diffusion_config(TINY_UNET)
    with np.load(released / "out" / "samples.npz") as f:  # the preset's network, seeded per sample
        ours = to_uint8(sample_batch(p, [1, 2], [0, 1], options(args, 2.0)))
        assert np.abs(f["arr_0"].astype(int) - ours.astype(int)).max() <= 1


def test_flags_that_differ_from_the_preset_are_named(released, capsys):
    """Leaving out --use_new_attention_order adds no parameter, so loading succeeds; the warning is
    all that tells the user the images are not the paper's."""
    without = TINY_UNET.replace(" --use_new_attention_order True", "")
    code, _, err = run(capsys, "--model", released / "64x64_diffusion.pt", "--adm-flags", without,
                       "--classifier", released / "64x64_classifier.pt", "--classifier-flags", TINY_CLASSIFIER,
                       "--class", 1, "--steps", 2, "--num-samples", 1, "--out", released / "out")
    assert code == 0
    lines = [n for n in err.strip().splitlines() if "looks ruined" not in n]  # random weights: ruined images
    assert lines == ["warning: --adm-flags differ from the published flags of 64x64_diffusion.pt (other images than "
                     "the paper's): --use_new_attention_order False (published: True)"]


def test_flag_differences_on_the_real_presets():
    preset = adm.PUBLISHED["64x64_diffusion.pt"]
    assert adm.flag_differences(preset, "64x64_diffusion.pt") == []
    # not sampled here (fp16 is --precision, dropout and respacing are not the network's), or only spelt otherwise
    same = preset.replace("--use_fp16 True", "--use_fp16 False").replace("--dropout 0.1", "--timestep_respacing 250")
    same = same.replace("32,16,8", "8,16,32") + " --channel_mult 1,2,3,4"
    assert adm.flag_differences(same, "64x64_diffusion.pt") == []
    missing = preset.replace(" --use_new_attention_order True", "")
    assert adm.flag_differences(missing, "64x64_diffusion.pt") == ["--use_new_attention_order False (published: True)"]
    clf = adm.PUBLISHED["256x256_classifier.pt"].replace("--classifier_depth 2", "--classifier_depth 4")
    assert adm.flag_differences(clf, "256x256_classifier.pt") == ["--classifier_depth 4 (published: 2)"]
    cosine = adm.PUBLISHED["256x256_diffusion.pt"].replace("linear", "cosine")
    assert adm.flag_differences(cosine, "256x256_diffusion.pt") == ["--noise_schedule cosine (published: linear)"]


# -- 3. messages that say what to do with an official checkpoint --------------------------------------
def test_bare_state_dict_without_flags_is_told_about_adm_flags(tmp_path, capsys):
    save_random(adm.create_model, TINY_UNET, tmp_path / "ema_0.9999_432000.pt")
    save_random(adm.create_classifier, TINY_CLASSIFIER, tmp_path / "model_classifier.pt")
    code, _, err = run(capsys, "--model", tmp_path / "ema_0.9999_432000.pt", "--out", tmp_path / "o")
    assert code == 2 and "like the paper's released ADM checkpoints, which take their published flags with " \
                         "--adm-flags" in err and "config.yaml" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "--model", "uncond", "--classifier", tmp_path / "model_classifier.pt", "--out",
                       tmp_path / "o")
    assert code == 2 and "--classifier-flags" in err


@pytest.mark.parametrize("name, damage, message", [
    ("64x64_diffusion.pt", b"", "is empty (0 bytes): download it again (" + adm.RELEASE_URL + "64x64_diffusion.pt)"),
    ("256x256_diffusion.pt", b"PK\x03\x04 cut short", "is truncated or corrupt ("),
    ("mine.pt", b"", "is empty (0 bytes): copy, export or download it again"),
    ("128x128_diffusion.pt", None, "does not exist (download it from " + adm.RELEASE_URL + "128x128_diffusion.pt)"),
])
def test_damaged_official_checkpoint_is_not_told_to_resume(tmp_path, capsys, name, damage, message):
    if damage is not None:
        (tmp_path / name).write_bytes(damage)
    flags = adm.PUBLISHED.get(name, TINY_UNET)  # no warning: the file is refused before any network is built
    code, _, err = run(capsys, "--model", tmp_path / name, "--adm-flags", flags, "--out", tmp_path / "o")
    assert code == 2 and message in err and "resume" not in err and len(err.strip().splitlines()) == 1, err
    if name == "256x256_diffusion.pt":
        assert err.strip().endswith(f"download it again ({adm.RELEASE_URL}256x256_diffusion.pt)")


def test_a_released_name_passed_the_wrong_way_round(tmp_path, capsys):
    code, _, err = run(capsys, "--model", tmp_path / "64x64_classifier.pt", "--out", tmp_path / "o")
    assert code == 2 and "is the released classifier 64x64_classifier.pt: pass it as --classifier" in err


# -- 4. the application's default path reproduces the reference's guided DDIM -------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    if not GUIDED_A.exists():
        pytest.fail(f"the shared conformance file {GUIDED_A} is missing")
    d = torch.load(GUIDED_A, weights_only=True)
    folder = tmp_path_factory.mktemp("guided_a")
    torch.save(d["unet_state_dict"], folder / "unet.pt")
    torch.save(d["classifier_state_dict"], folder / "classifier.pt")
    schedule = {k: d[k] for k in ("noise_schedule", "diffusion_steps")}
    argv = ["--model", folder / "unet.pt", "--adm-flags", flag_string({**d["unet_flags"], **schedule}),
            "--classifier", folder / "classifier.pt", "--classifier-flags", flag_string(d["classifier_flags"]),
            "--class", ",".join(str(int(c)) for c in d["y"]), "--sampler", "ddim", "--steps", d["timestep_respacing"],
            "--scale", float(d["classifier_scale"])]
    return d, [str(a) for a in argv]


def test_cli_path_runs_the_reference_guided_ddim_loop(reference):
    """The sample CLI's model loading, option defaults and sample_batch, from the file's x_T: the
    guided and unguided DDIM loops to the runner's tolerance (the file's loop is unclipped)."""
    d, argv = reference
    assert d["ddim_eta"] == 0 and not d["ddim_clip_denoised"]
    args = build_parser().parse_args([*argv, "--no-clip"])
    p = load_pipeline(args, "cpu")
    y = [int(c) for c in d["y"]]
    for key, scale in (("ddim_sample", args.scale), ("ddim_sample_unguided", 0.0)):
        ours = sample_batch(p, y, [0, 1], options(args, scale), x_T=d["ddim_x_T"])
        assert rel_error(ours, d[key]) <= LOOP_TOL, key


def test_cli_defaults_take_the_reference_guided_ddim_step(reference):
    """At the CLI's defaults (x0 clipped, as the reference's clip_denoised=True) one guided DDIM step
    from the file's step_x gives the reference's guided x0 (28% of it outside [-1, 1], where any
    extra clip would show) and the DDIM update (Song et al. eq. 12) taken from it."""
    d, argv = reference
    args = build_parser().parse_args(argv)
    opts = options(args, args.scale)
    assert resolve(load_pipeline(args, "cpu"), opts).clip == "static" and d["clip_denoised"]
    p = load_pipeline(args, "cpu")
    x, i = d["step_x"], int(d["step_index"][0])
    diffusion, model_fn, kw = discrete_sampler(p, [int(c) for c in d["y"]], opts, SampleNoise([0, 1]))
    with torch.no_grad():
        x_prev, out = ddim_step(diffusion, model_fn, x, i, **kw)
    ref_x0 = d["condition_score_pred_xstart"]
    assert (ref_x0.abs() > 1).float().mean() > 0.2
    assert rel_error(out["pred_xstart"], ref_x0) <= TOL
    t = torch.full((len(x),), i, dtype=torch.long)
    abar_prev = diffusion.extract(diffusion.alphas_cumprod_prev, t, x)
    expected = ref_x0 * abar_prev.sqrt() + (1 - abar_prev).sqrt() * diffusion.eps_from_xstart(x, t, ref_x0)
    assert rel_error(x_prev, expected) <= TOL


def test_cli_defaults_take_the_reference_guided_ddpm_step(reference):
    """--sampler ddpm at the CLI's defaults: the reference's mean shift (Algorithm 1) and variance."""
    d, argv = reference
    args = build_parser().parse_args([*argv, "--sampler", "ddpm"])
    p = load_pipeline(args, "cpu")
    diffusion, model_fn, kw = discrete_sampler(p, [int(c) for c in d["y"]], options(args, args.scale),
                                               SampleNoise([0, 1]))
    with torch.no_grad():
        _, out = ddpm_step(diffusion, model_fn, d["step_x"], int(d["step_index"][0]), **kw)
    assert rel_error(out["mean"], d["condition_mean"]) <= TOL
    assert rel_error(out["variance"], d["p_variance"]) <= TOL


def test_the_extra_clip_would_be_seen(reference):
    """The step check above is not blind to the departure it guards against."""
    d, argv = reference
    args = build_parser().parse_args([*argv, "--clip-guided"])
    p = load_pipeline(args, "cpu")
    diffusion, model_fn, kw = discrete_sampler(p, [int(c) for c in d["y"]], options(args, args.scale),
                                               SampleNoise([0, 1]))
    with torch.no_grad():
        _, out = ddim_step(diffusion, model_fn, d["step_x"], int(d["step_index"][0]), **kw)
    assert rel_error(out["pred_xstart"], d["condition_score_pred_xstart"]) > 100 * TOL
