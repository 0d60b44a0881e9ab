"""sample_guided.py on the shipped digits models: the README's command, sweeps, guidance, refusals."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided.cli.sample import main
from guided.generation.loading import SHIPPED
from guided.evaluation.judge import load_judge

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_readme_command_on_the_shipped_models(tmp_path, capsys):
    code, out, _ = run(capsys, "--class", 3, "--scale", 4, "--num-samples", 20, "--steps", 25, "--out", tmp_path)
    assert code == 0 and "wrote" in out
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_0"].shape == (20, 16, 16, 3) and f["arr_0"].dtype == np.uint8
        assert (f["arr_1"] == 3).all()
        images = f["arr_0"]
    assert (tmp_path / "grid.png").exists() and (tmp_path / "settings.json").exists()
    assert load_judge(16).accuracy(images, np.full(20, 3)) >= 0.8  # they are threes
    assert (images == images[..., :1]).all()  # grey: the one-channel model's samples have equal channels, no tint


def test_classifier_guidance_steers_the_unconditional_model(tmp_path, capsys):
    """The paper's unconditional-ImageNet case in small: guidance alone picks the class."""
    judge = load_judge(16)
    acc = {}
    for scale in (0, 8):
        out = tmp_path / f"s{scale}"
        assert run(capsys, "--model", "uncond", "--class", 7, "--scale", scale, "--num-samples", 20,
                   "--steps", 25, "--out", out)[0] == 0
        acc[scale] = judge.accuracy(np.load(out / "samples.npz")["arr_0"], np.full(20, 7))
    assert acc[0] < 0.5 and acc[8] >= 0.8, acc


def test_a_sweep_writes_one_folder_per_scale(tmp_path, capsys):
    code, out, _ = run(capsys, "--model", "uncond", "--class", "1,2", "--scales", "0,2", "--num-samples", 2,
                       "--steps", 5, "--out", tmp_path)
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scale_0", "scale_2"]
    assert all((tmp_path / d / "samples.npz").exists() for d in ("scale_0", "scale_2"))


def test_mismatched_resolution_is_refused(tmp_path, capsys):
    from guided.networks import adm
    clf = adm.create_classifier("--image_size 32 --classifier_width 32 --classifier_depth 1 --channel_mult 1,2 "
                                "--classifier_attention_resolutions 8 --num_classes 10")
    torch.save(clf.state_dict(), tmp_path / "clf32.pt")
    code, _, err = run(capsys, "--model", "uncond", "--classifier", tmp_path / "clf32.pt", "--classifier-flags",
                       "--image_size 32 --classifier_width 32 --classifier_depth 1 --channel_mult 1,2 "
                       "--classifier_attention_resolutions 8 --num_classes 10", "--out", tmp_path / "o")
    assert code == 2 and "classifier takes 32x32x3 images but the score model makes 16x16x1" in err


@pytest.mark.parametrize("argv, message", [
    (["--class", "12"], "class index 12 is out of range"),
    (["--num-samples", "-5"], "--num-samples: invalid positive int value: '-5'"),
    (["--scale", "strong"], "--scale: invalid non-negative float value: 'strong'"),
    (["--model", "missing.pt"], "missing.pt"),
    (["--class", "golden retriever"], "not in this label map"),
    (["--model", "uncond", "--sampler", "langevin"], "needs an NCSN model"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    try:  # argparse errors exit from inside main, the rest return 2
        code = main([*argv, "--out", str(tmp_path)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_existing_samples_are_not_overwritten(tmp_path, capsys):
    args = ("--model", "uncond", "--num-samples", 2, "--steps", 3, "--out", tmp_path)
    assert run(capsys, *args)[0] == 0
    before = (tmp_path / "samples.npz").read_bytes()
    code, _, err = run(capsys, *args, "--seed", 9)
    assert code == 2 and "already holds samples.npz; pass --overwrite" in err
    assert (tmp_path / "samples.npz").read_bytes() == before
    assert run(capsys, *args, "--seed", 9, "--overwrite")[0] == 0
    assert (tmp_path / "samples.npz").read_bytes() != before


def test_shipped_models_are_small():
    assert sum(f.stat().st_size for f in SHIPPED.glob("*.pt")) < 20 * 2**20


def _two_process_sampling(out_dir):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked: forget the parent's single process
    torch.set_num_threads(1)  # the parent's OpenMP thread pool does not survive fork: use none
    assert main(["--model", "uncond", "--class", "1,2", "--num-samples", "6", "--batch-size", "2", "--steps", "4",
                 "--device", "cpu", "--out", out_dir]) == 0


def test_two_processes_draw_their_shares_into_one_output(tmp_path):
    """Under accelerate (gloo on CPU) each process draws every other batch; rank 0 gathers them,
    and the result is the single-process one (per-sample seeds)."""
    from accelerate import debug_launcher

    debug_launcher(_two_process_sampling, args=(str(tmp_path / "two"),), num_processes=2)
    assert main(["--model", "uncond", "--class", "1,2", "--num-samples", "6", "--batch-size", "2", "--steps", "4",
                 "--out", str(tmp_path / "one")]) == 0
    two, one = np.load(tmp_path / "two" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    assert two["arr_0"].shape == (6, 16, 16, 3) and np.array_equal(two["arr_1"], one["arr_1"])
    assert np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int)).max() <= 2


# -- nothing silently wrong ---------------------------------------------------------------------------
def test_repeated_class_options_add_up(tmp_path, capsys):
    code, out, _ = run(capsys, "--class", 3, "--class", "5", "--num-samples", 4, "--steps", 3, "--sampler", "ddim",
                       "--out", tmp_path)
    assert code == 0 and "sampling on 1 process, device cpu" in out  # world size and device, first thing
    with np.load(tmp_path / "samples.npz") as f:
        assert f["arr_1"].tolist() == [3, 5, 3, 5]


def test_labels_nothing_enforces_are_said_and_recorded(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "uncond", "--class", 7, "--scale", 0, "--num-samples", 2, "--steps", 3,
                       "--out", tmp_path / "free")
    assert code == 0 and "note: the labels are requests that nothing enforces: uncond samples without labels" in err
    assert json.loads((tmp_path / "free" / "settings.json").read_text())["labels_enforced"] is False
    code, _, err = run(capsys, "--model", "uncond", "--class", 7, "--scale", 2, "--num-samples", 2, "--steps", 3,
                       "--out", tmp_path / "guided")
    assert code == 0 and "nothing enforces" not in err
    assert json.loads((tmp_path / "guided" / "settings.json").read_text())["labels_enforced"] is True


def test_settings_record_the_classifier_used_and_the_sdedit_inputs(tmp_path, capsys):
    stroke, mask = REPO / "docs" / "strokes" / "stroke_7.png", tmp_path / "mask.png"
    Image.new("L", Image.open(stroke).size, 255).save(mask)
    code = run(capsys, "--model", "uncond", "--init-image", stroke, "--t0", 0.4, "--mask", mask, "--class", 7,
               "--num-samples", 2, "--steps", 10, "--sampler", "ddim", "--out", tmp_path / "o")[0]
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert code == 0 and settings["classifier"] == "classifier"  # the shipped default, not null
    assert (settings["init_image"], settings["t0"], settings["mask"]) == (str(stroke), 0.4, str(mask))
    assert run(capsys, "--model", "uncond", "--classifier", "none", "--scale", 0, "--num-samples", 1, "--steps", 2,
               "--out", tmp_path / "p")[0] == 0
    settings = json.loads((tmp_path / "p" / "settings.json").read_text())
    assert settings["classifier"] == "none" and settings["init_image"] is None and settings["t0"] is None


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("guidance scale s (0 = none) (default: 1 where the model has a noise-aware classifier and no other guidance method is named, else 0)", "(default: 100; the ode and langevin",
                  "(default: out)", "how many samples to draw (default: 100)",
                  "(default: the model's own, set in its config's sampling node: dpm++2m-sde on karras20 for the "
                  "shipped cond and uncond models asked for no --steps either; else ddpm for eps models, langevin "
                  "for NCSN models)"):
        assert shown in text, shown


def test_the_shipped_models_default_to_the_few_step_sampler(tmp_path, capsys):
    """Asked for neither --sampler nor --steps, the shipped models sample with DPM-Solver++(2M) SDE on
    karras20, statically thresholded (README "Guided sampling in few steps"): the same images as
    naming those settings; naming --steps, another model or an init image keeps the paper's ddpm."""
    from guided.cli.options import options
    from guided.cli.sample import build_parser
    from guided.generation import load_pipeline
    from guided.generation.resolve import resolve

    def resolved(*argv, model="uncond", editing=False):
        args = build_parser().parse_args(["--model", model, *argv])
        opts = resolve(load_pipeline(model), options(args, 1.0), editing=editing)  # decided after loading
        return opts.sampler, opts.steps, opts.clip

    assert resolved() == ("dpm++2m-sde", "karras20", "static")
    assert resolved("--steps", "50", model="cond") == ("ddpm", "50", "static")
    assert resolved("--sampler", "edm", "--steps", "karras10") == ("edm", "karras10", "static")
    assert resolved("--sampler", "dpm++2m-sde", "--sampler-arg", "threshold=dynamic") == \
        ("dpm++2m-sde", "100", "dynamic")
    assert resolved("--sampler", "langevin", model="ncsn")[0] == "langevin"
    assert resolved(model="ncsn")[0] == "langevin"  # the registry's default for an NCSN model
    assert resolved(editing=True)[0] == "ddpm"

    base = ("--model", "uncond", "--class", 4, "--scale", 2.5, "--num-samples", 3, "--seed", 7, "--grid", 0)
    assert run(capsys, *base, "--out", tmp_path / "default")[0] == 0
    assert run(capsys, *base, "--sampler", "dpm++2m-sde", "--steps", "karras20", "--sampler-arg", "threshold=static",
               "--out", tmp_path / "named")[0] == 0
    with np.load(tmp_path / "default" / "samples.npz") as a, np.load(tmp_path / "named" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    settings = json.loads((tmp_path / "default" / "settings.json").read_text())["options"]
    assert (settings["sampler"], settings["steps"], settings["clip"], settings["settings"]) == (
        "dpm++2m-sde", "karras20", "static", {"eta": 1.0})  # every value that shaped the samples


def test_grid_size_is_an_option(tmp_path, capsys):
    args = ("--model", "uncond", "--class", "1,2", "--num-samples", 6, "--steps", 2, "--sampler", "ddim")
    assert run(capsys, *args, "--grid", 3, "--out", tmp_path / "g3")[0] == 0
    assert Image.open(tmp_path / "g3" / "grid.png").size == (3 * 18 * 4, 2 * 18 * 4)  # 16 px cells, 4x zoom
    code, out, _ = run(capsys, *args, "--out", tmp_path / "default")  # up to 10 per class: the 3 each there are
    assert code == 0 and Image.open(tmp_path / "default" / "grid.png").size == (3 * 72, 2 * 72)  # no white columns
    assert f"grid.png" in out
    code, out, _ = run(capsys, *args, "--grid", 0, "--out", tmp_path / "none")
    assert not (tmp_path / "none" / "grid.png").exists() and (tmp_path / "none" / "samples.npz").exists()
    assert code == 0 and "grid.png" not in out  # every message names only files that exist


def test_a_saturating_guidance_scale_warns(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "uncond", "--class", 7, "--scale", "1e30", "--sampler", "ddim", "--steps", 5,
                       "--num-samples", 4, "--batch-size", 2, "--out", tmp_path)
    assert code == 0 and "warning: batch 0 (samples 0..1) looks ruined: " in err
    assert "lower --scale 1e+30" in err
    assert "warning: 2 batches of this run look ruined (batches 0..2)" in err
    with np.load(tmp_path / "samples.npz") as f:
        assert np.isin(f["arr_0"], (0, 255)).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_ruined_images_at_a_huge_scale_warn_and_say_what_to_do(tmp_path, capsys, sampler):
    """--scale 1e6 --num-samples 4 --steps 20: inverted blobs and speckle (46% / 42% of the pixels at 0 or
    255, under the old one-sided threshold); a healthy scale gets no warning."""
    code, _, err = run(capsys, "--scale", "1e6", "--sampler", sampler, "--num-samples", 4, "--steps", 20,
                       "--out", tmp_path / "ruined")
    assert code == 0 and "warning: batch 0 (samples 0..3) looks ruined" in err, err
    assert "lower --scale 1e+06" in err
    code, _, err = run(capsys, "--scale", 10, "--sampler", sampler, "--num-samples", 4, "--steps", 20,
                       "--out", tmp_path / "fine")
    assert code == 0 and "ruined" not in err, err


def test_the_ruin_rule_on_real_digits_and_on_speckle():
    from guided.evaluation.judge import digits_data
    from guided.generation.images import ruin

    real = np.repeat(digits_data(16)[0], 3, axis=-1)
    assert ruin(real) is None  # the training digits: 30% black background, 1% white
    checker = np.zeros((2, 16, 16, 3), np.uint8)
    checker[:, ::2, ::2] = checker[:, 1::2, 1::2] = 255
    assert "jump" in ruin(checker)
    assert "at 0" in ruin(np.zeros((2, 16, 16, 3), np.uint8))  # flat black


def test_two_cpu_processes_under_the_readme_recipe(tmp_path):
    """ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2, without --device: two real
    processes share the batches and give the single-process samples."""
    argv = ["--model", "uncond", "--class", "1,2", "--num-samples", "6", "--batch-size", "2", "--steps", "4"]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(REPO / "sample_guided.py"), *argv, "--out", str(tmp_path / "two")],
                          env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "sampling on 2 processes, device cpu" in proc.stdout, proc.stderr[-3000:]
    assert "error" not in proc.stderr and not (tmp_path / "two" / ".lock").exists()
    assert main(argv + ["--device", "cpu", "--out", str(tmp_path / "one")]) == 0
    two, one = np.load(tmp_path / "two" / "samples.npz"), np.load(tmp_path / "one" / "samples.npz")
    assert np.array_equal(two["arr_1"], one["arr_1"])
    assert np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int)).max() <= 2


# -- what runs is what was asked: guidance defaults --------------------------------------------------
def _active(settings: dict) -> set:
    from guided.generation.options import METHODS

    return {m.term for m in METHODS if settings["options"][m.scale] != m.off}


def readme_sampling_commands() -> list[str]:
    """Every `python sample_guided.py ...` line of the bash blocks of the README and of the documentation
    pages (doc_commands.pages(): README.md and docs/**/*.md), but those that need files nobody has here
    (official checkpoints, runs/, diffusers folders)."""
    from doc_commands import bash_commands

    found = []
    for _, command in bash_commands():
        if "python sample_guided.py" not in command:
            continue
        command = command[command.index("python sample_guided.py"):]
        argv = shlex.split(command)[2:]
        files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--model", "--classifier")]
        if all(f in ("cond", "uncond", "ncsn", "none") for f in files):
            found.append(command)
    return found


# each sampling example of the README and the documentation pages -> the guidance its text describes
README_GUIDANCE = {
    "python sample_guided.py --class 3 --scale 4 --num-samples 100 --out out/": {"classifier"},
    "python sample_guided.py --class 3 --scale 4": {"classifier"},
    "python sample_guided.py --model uncond --class 7 --scale 10": {"classifier"},
    "python sample_guided.py --model uncond --scales 0,1,2,4,10 --out sweep/": {"classifier"},  # but at scale 0
    "python sample_guided.py --cfg-scale 2": {"cfg"},
    "python sample_guided.py --class 3 --scale 2 --sampler ddpm --steps 250": {"classifier"},
    "python sample_guided.py --sampler dpm++ --steps quad25": {"classifier"},
    "python sample_guided.py --sampler dpm++3m --steps karras20": {"classifier"},
    "python sample_guided.py --model uncond --init-image docs/strokes/stroke_7.png --t0 0.6 --class 7 --scale 4":
        {"classifier"},
    "python sample_guided.py --model uncond --init-image docs/strokes/stroke_7.png --t0 0.6 --class 7 --scale 4 "
    "--num-samples 8": {"classifier"},
    "python sample_guided.py --model uncond --class 7 --scale 4 --interval 0.28,5.42": {"classifier"},
    "python sample_guided.py --model cond --class 7 --autoguide-scale 2": {"autoguide"},
    "python sample_guided.py --model uncond --class 7 --x0-scale 4": {"x0_classifier"},
    "python sample_guided.py --model cond --cfg-scale 2 --cfg-interval 0.28,5.42 --scale 1": {"cfg", "classifier"},
    "python sample_guided.py --model uncond --class 7 --scale 4 --ddpm-form score": {"classifier"},
    # docs/guide/few-step.md, "Which to use when"
    "python sample_guided.py --sampler dpm++2m-sde --steps karras10 --sampler-arg eta=0.5": {"classifier"},
    "python sample_guided.py --sampler dpm++ --steps karras8": {"classifier"},
    "python sample_guided.py --model cond --autoguide-scale 1.75 --autoguide-interval 1,10 --sampler dpm++2m-sde "
    "--steps karras16": {"autoguide"},
    "python sample_guided.py --model cond --autoguide-scale 2 --autoguide-interval 2,3 --sampler dpm++2m-sde "
    "--steps logsnr9": {"autoguide"},
}


def test_every_readme_sampling_example_runs_the_guidance_its_text_describes(tmp_path, capsys):
    """A named method runs alone; settings.json names a network only for a term that guides."""
    import shlex

    commands = readme_sampling_commands()
    assert sorted(set(commands)) == sorted(README_GUIDANCE), "a documented example without its expected guidance"
    for k, command in enumerate(README_GUIDANCE):
        out = tmp_path / str(k)
        argv = shlex.split(command)[2:] + ["--num-samples", 2, "--batch-size", 2, "--steps", 3, "--out", out]
        assert run(capsys, *argv)[0] == 0, command
        for record in sorted(out.rglob("settings.json")):
            settings = json.loads(record.read_text())
            expected = README_GUIDANCE[command] - ({"classifier"} if record.parent.name == "scale_0" else set())
            assert _active(settings) == expected, (command, record)
            assert (settings["classifier"] != "none") == ("classifier" in README_GUIDANCE[command]), command
            assert (settings["autoguide"] is not None) == ("autoguide" in expected), command
            assert (settings["x0_classifier"] is not None) == ("x0_classifier" in expected), command


def test_a_model_without_a_classifier_samples_unguided(tmp_path, capsys):
    """sample_guided.py --model runs/MYRUN --class 3 on a user's own run: no classifier, no guidance."""
    from conftest import TINY_TRAIN, TINY_UNET
    from guided.cli.train import main_diffusion

    assert main_diffusion(TINY_UNET + TINY_TRAIN + ["train.steps=1", f"train.out_dir={tmp_path / 'run'}"]) == 0
    code, _, err = run(capsys, "--model", tmp_path / "run", "--class", 3, "--num-samples", 2, "--steps", 2,
                       "--out", tmp_path / "o")
    assert code == 0, err
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert _active(settings) == set() and settings["classifier"] == "none" and settings["labels_enforced"]


def test_the_three_programs_share_the_guidance_defaults():
    """sample_guided.py, the sweep and the demo resolve --scale by one rule, after loading."""
    from guided.cli import demo, sample, sweep
    from guided.cli.options import options, pipeline_keywords
    from guided.generation import load_pipeline
    from guided.generation.resolve import resolve

    cases = {(): 1.0, ("--autoguide-scale", "2"): 0.0, ("--x0-scale", "4"): 0.0, ("--cfg-scale", "2"): 0.0,
             ("--classifier", "none"): 0.0, ("--cfg-scale", "2", "--scale", "3"): 3.0}
    for argv, scale in cases.items():
        for program, more in ((sample, []), (sweep, ["--out", "s"]), (demo, [])):
            args = program.build_parser().parse_args([*argv, *more])
            p = load_pipeline(**pipeline_keywords(args, "cpu"))
            assert resolve(p, options(args, args.scale)).scale == scale, (program, argv)
    args = sweep.build_parser().parse_args(["--sweep", "x0_scale=1,2", "--out", "s"])
    assert sweep.base_scale(args, "x0_scale") == 0.0  # the swept method runs alone
    for argv, start in {(): ("classifier", 1.0), ("--x0-scale", "3"): ("x0-classifier", 3.0),
                        ("--method", "autoguidance"): ("autoguidance", 2.0), ("--classifier", "none"): ("none", 0.0),
                        ("--method", "classifier", "--scale", "6"): ("classifier", 6.0)}.items():
        args = demo.build_parser().parse_args(list(argv))
        p = load_pipeline(**pipeline_keywords(args, "cpu", optional=("autoguide", "x0_classifier")))
        assert demo.start(args, p)[:2] == start, argv


def test_overwrite_leaves_nothing_of_the_previous_run(tmp_path, capsys):
    base = ("--steps", 2, "--sampler", "ddim", "--png", "--out", tmp_path)
    assert run(capsys, "--class", 3, "--class", 5, "--num-samples", 4, *base)[0] == 0
    assert len(list((tmp_path / "images").iterdir())) == 4
    code, out, _ = run(capsys, "--class", 7, "--num-samples", 2, "--overwrite", *base)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000_class7.png", "000001_class7.png"]
    assert json.loads((tmp_path / "settings.json").read_text())["classes"] == [7]
    code, out, _ = run(capsys, "--class", 7, "--num-samples", 2, "--overwrite", "--grid", 0, *base[:-3], "--out",
                       tmp_path)
    assert code == 0 and not (tmp_path / "images").exists() and not (tmp_path / "grid.png").exists()
    for name in ("samples.npz", "settings.json"):
        assert name in out and (tmp_path / name).exists()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.txt").write_text("a file of the user's")  # not ours: kept
    assert run(capsys, "--class", 7, "--num-samples", 2, "--overwrite", *base)[0] == 0
    assert (tmp_path / "images" / "mine.txt").exists()


def test_the_batch_size_changes_samples_by_float_rounding_only():
    """Sample i uses seed + i at any batch size; the CPU's batched convolutions round differently by
    batch size, so the images agree to ~1e-6 before the uint8 conversion (README: the tolerance)."""
    from guided.generation import SampleOptions, load_pipeline, sample_batch

    p = load_pipeline("cond")
    opts = SampleOptions(sampler="ddpm", steps="20", scale=4.0)
    y = np.arange(6) % 10
    one = sample_batch(p, y, np.arange(6), opts)
    split = torch.cat([sample_batch(p, y[i:i + 2], np.arange(i, i + 2), opts) for i in range(0, 6, 2)])
    assert (one - split).abs().max().item() < 1e-4
