"""sample_guided.py on the shipped digits models: the README's command, sweeps, guidance, refusals."""
import json
import os
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
    for shown in ("guidance scale s (0 = none) (default: 1.0)", "(default: 100; the ode and langevin",
                  "(default: out)", "how many samples to draw (default: 100)", "(default: ddpm)"):
        assert shown in text, shown


def test_grid_size_is_an_option(tmp_path, capsys):
    args = ("--model", "uncond", "--class", "1,2", "--num-samples", 6, "--steps", 2, "--sampler", "ddim")
    assert run(capsys, *args, "--grid", 3, "--out", tmp_path / "g3")[0] == 0
    assert Image.open(tmp_path / "g3" / "grid.png").size == (3 * 18 * 4, 2 * 18 * 4)  # 16 px cells, 4x zoom
    assert run(capsys, *args, "--out", tmp_path / "default")[0] == 0  # 10 per class: the 3 each there are
    assert Image.open(tmp_path / "default" / "grid.png").size == (10 * 72, 2 * 72)
    assert run(capsys, *args, "--grid", 0, "--out", tmp_path / "none")[0] == 0
    assert not (tmp_path / "none" / "grid.png").exists() and (tmp_path / "none" / "samples.npz").exists()


def test_a_saturating_guidance_scale_warns(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "uncond", "--class", 7, "--scale", "1e30", "--sampler", "ddim", "--steps", 5,
                       "--num-samples", 4, "--batch-size", 2, "--out", tmp_path)
    assert code == 0 and ("warning: batch 0 (samples 0..1) is saturated: 100% of its pixels are at 0 or 255 "
                          "(is --scale 1e+30 too large?)") in err
    assert "warning: 2 batches of this run were saturated (batches 0..2)" in err
    with np.load(tmp_path / "samples.npz") as f:
        assert np.isin(f["arr_0"], (0, 255)).all()


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
