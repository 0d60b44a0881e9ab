"""sample_guided.py on the shipped digits models: the README's command, sweeps, guidance, refusals."""
import numpy as np
import pytest
import torch

from guided.cli.sample import SHIPPED, main
from guided.judge import load_judge


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
    from guided import adm
    clf = adm.create_classifier("--image_size 32 --classifier_width 32 --classifier_depth 1 --channel_mult 1,2 "
                                "--classifier_attention_resolutions 8 --num_classes 10")
    torch.save(clf.state_dict(), tmp_path / "clf32.pt")
    code, _, err = run(capsys, "--model", "uncond", "--classifier", tmp_path / "clf32.pt", "--classifier-flags",
                       "--image_size 32 --classifier_width 32 --classifier_depth 1 --channel_mult 1,2 "
                       "--classifier_attention_resolutions 8 --num_classes 10", "--out", tmp_path / "o")
    assert code == 2 and "classifier takes 32x32x3 images but the score model makes 16x16x3" in err


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
