"""python -m guided.cli.sweep on the shipped digits models: seeds and their spread, recorded settings that
keep rows from mixing, resuming and extending, one-line errors; and --class-sampling."""
import json
import os
import subprocess

import numpy as np
import pytest

from guided.errors import GuidedError
from guided.evaluation.evaluate import read_npz
from guided.generation import plan_labels
from guided.cli.sweep import main, parse_sweep

FAST = ["--model", "cond", "--num-samples", "12", "--batch-size", "12", "--sampler", "ddim", "--steps", "3",
        "--device", "cpu"]


def run(capsys, *argv):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err):
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """A finished sweep: scales 0 and 4, two seeds of 12 samples each."""
    out = tmp_path_factory.mktemp("sweep") / "s"
    assert main([*FAST, "--scales", "0,4", "--seeds", "2", "--out", str(out)]) == 0
    return out


def test_seeds_give_mean_std_min_of_every_metric(two_seeds):
    results = json.loads((two_seeds / "results.json").read_text())
    assert results["param"] == "scale" and results["features"] == "digits16"
    assert len(results["runs"]) == 4 and {r["seed"] for r in results["runs"]} == {0, 12}
    for row in results["summary"]:
        mine = [r for r in results["runs"] if r["scale"] == row["scale"]]
        assert row["seeds"] == 2 and row["num_samples"] == 12
        for m in ("fid", "sfid", "inception_score", "precision", "recall", "judge_accuracy"):
            v = [r[m] for r in mine]
            assert row[m]["mean"] == pytest.approx(np.mean(v)) and row[m]["std"] == pytest.approx(np.std(v, ddof=1))
            assert row[m]["min"] == min(v) and row[m]["max"] == max(v)
    csv_rows = (two_seeds / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("scale,seeds,num_samples,") and "fid_mean,fid_std,fid_min,fid_max" in csv_rows[0]
    assert len(csv_rows) == 3 and len((two_seeds / "runs.csv").read_text().splitlines()) == 5
    assert (two_seeds / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_repetitions_draw_disjoint_noise(two_seeds, tmp_path):
    """Repetition j is sample_guided.py --seed seed + j * N: sample i of it uses seed + j * N + i,
    so no two repetitions share noise."""
    from guided.cli.sample import main as sample
    assert sample(["--model", "cond", "--scale", "4", "--num-samples", "12", "--seed", "12", "--sampler", "ddim",
                   "--steps", "3", "--device", "cpu", "--out", str(tmp_path / "s12")]) == 0
    first, _ = read_npz(two_seeds / "scale_4" / "seed_0" / "samples.npz")
    second, _ = read_npz(two_seeds / "scale_4" / "seed_12" / "samples.npz")
    assert np.array_equal(second, read_npz(tmp_path / "s12" / "samples.npz")[0])
    assert not np.array_equal(first, second)


def test_a_finished_sweep_rerun_says_it_is_complete_and_prints_the_table(two_seeds, capsys):
    """As found: a finished sweep rerun printed nothing."""
    before = (two_seeds / "results.json").read_bytes()
    code, out, _ = run(capsys, *FAST, "--scales", "0,4", "--seeds", "2", "--out", two_seeds)
    assert code == 0 and "is complete: 2 values x 2 seeds already evaluated" in out
    header, *rows = out.splitlines()[1:]
    assert header.split()[:4] == ["scale", "seeds", "samples", "inception_score"]
    assert [r.split()[:3] for r in rows] == [["0", "2", "12"], ["4", "2", "12"]]
    assert (two_seeds / "results.json").read_bytes() == before


def test_other_settings_are_refused_and_rows_never_mix(tmp_path, capsys):
    """As found: a rerun with other settings kept the old rows and added new ones to one table."""
    out = tmp_path / "s"
    assert run(capsys, *FAST, "--scales", "0,4", "--out", out)[0] == 0
    before = {f: (out / f).read_bytes() for f in ("results.json", "results.csv", "settings.json")}
    other = ["--model", "cond", "--num-samples", "16", "--batch-size", "16", "--sampler", "ddpm", "--steps", "4",
             "--device", "cpu", "--scales", "0,4,10", "--out", out]
    code, _, err = run(capsys, *other)
    line = error_line(err)
    assert code == 2 and "holds a sweep with other settings" in line and "--overwrite" in line
    assert "num_samples 12 -> 16" in line and "options.sampler 'ddim' -> 'ddpm'" in line
    assert {f: (out / f).read_bytes() for f in before} == before and not (out / "scale_10").exists()
    code, _, _ = run(capsys, *other, "--overwrite")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["scale"] for r in results["summary"]] == [0, 4, 10]
    assert {r["num_samples"] for r in results["runs"]} == {16} and results["settings"]["options"]["sampler"] == "ddpm"
    assert json.loads((out / "scale_0" / "seed_0" / "settings.json").read_text())["num_samples"] == 16


def test_same_settings_extend_the_sweep(tmp_path, capsys):
    out = tmp_path / "s"
    assert run(capsys, *FAST, "--scales", "2", "--out", out)[0] == 0
    first = json.loads((out / "results.json").read_text())["runs"]
    code, stdout, _ = run(capsys, *FAST, "--scales", "2,6", "--out", out)
    assert code == 0 and "scale=6 seed=0" in stdout and "scale=2 seed=0" not in stdout  # only the new one
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0] == first[0] and [r["scale"] for r in runs] == [2, 6]


def test_a_legacy_folder_or_a_sample_folder_is_refused(tmp_path, capsys):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "results.json").write_text('[{"scale": "0", "fid": 1.0}]')
    code, _, err = run(capsys, *FAST, "--scales", "0", "--out", legacy)
    assert code == 2 and "before sweeps recorded their settings" in error_line(err)
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "settings.json").write_text('{"model": "cond", "num_samples": 3}')
    code, _, err = run(capsys, *FAST, "--scales", "0", "--out", samples)
    assert code == 2 and "holds samples of sample_guided.py, not a sweep" in error_line(err)


def _readonly_folder(tmp_path):
    """A real read-only folder: a read-only tmpfs where mounting is allowed (root), else chmod."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro, lambda: ro.chmod(0o755)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("root without permission to mount: no way to make a real read-only folder here")
    return ro, lambda: subprocess.run(["umount", str(ro)], check=True)


def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    """As found: a sweep into a read-only folder ended in an OSError traceback."""
    ro, release = _readonly_folder(tmp_path)
    try:
        code, _, err = run(capsys, *FAST, "--scales", "0", "--out", ro)
        line = error_line(err)
        assert code == 2 and ("Read-only file system" in line or "Permission denied" in line), line
        code, _, err = run(capsys, *FAST, "--scales", "0", "--out", ro / "inside")
        assert code == 2 and f"cannot use {ro / 'inside'} as the sweep folder" in error_line(err)
    finally:
        release()


def test_another_parameter_can_be_swept(tmp_path, capsys):
    out = tmp_path / "cfg"
    code, stdout, _ = run(capsys, *FAST, "--sweep", "cfg_scale=1,3", "--scale", "0", "--out", out)
    assert code == 0 and "cfg_scale=3 seed=0" in stdout
    assert sorted(p.name for p in out.glob("cfg_scale_*")) == ["cfg_scale_1", "cfg_scale_3"]
    settings = json.loads((out / "cfg_scale_3" / "seed_0" / "settings.json").read_text())
    assert settings["options"]["cfg_scale"] == 3.0 and settings["options"]["scale"] == 0.0
    assert parse_sweep("steps=10,ddim5") == ("steps", ["10", "ddim5"])
    with pytest.raises(GuidedError, match="NAME one of scale, cfg_scale, autoguide_scale, x0_scale, .*, eta, steps"):
        parse_sweep("temperature=1,2")
    code, _, err = run(capsys, *FAST, "--sweep", "eta=-1", "--out", out / "bad")
    assert code == 2 and "values of eta must each be a non-negative float" in error_line(err)
    code, _, err = run(capsys, *FAST, "--sweep", "eta=0,1", "--scales", "1", "--out", out / "bad")
    assert code == 2 and "not both" in error_line(err)


# -- class sampling -----------------------------------------------------------------------------
def test_random_class_sampling_is_seeded_and_recorded(tmp_path):
    from guided.cli.sample import main as sample
    balanced = plan_labels(list(range(10)), 30)
    assert (balanced == np.arange(30) % 10).all()
    rand = plan_labels(list(range(10)), 1000, "random", seed=5)
    assert set(rand) == set(range(10)) and not (rand[:30] == balanced).all()
    assert np.array_equal(rand, plan_labels(list(range(10)), 1000, "random", seed=5))
    assert abs(np.bincount(rand).astype(float) / 1000 - 0.1).max() < 0.05  # uniform
    assert set(plan_labels([3, 7], 50, "random", seed=0)) == {3, 7}
    outs = {}
    for bs in (4, 10):
        out = tmp_path / f"bs{bs}"
        assert sample(["--model", "cond", "--num-samples", "10", "--batch-size", str(bs), "--steps", "2",
                       "--sampler", "ddim", "--class-sampling", "random", "--device", "cpu", "--out", str(out)]) == 0
        outs[bs] = read_npz(out / "samples.npz")
        assert json.loads((out / "settings.json").read_text())["class_sampling"] == "random"
    assert np.array_equal(outs[4][1], plan_labels(list(range(10)), 10, "random", seed=0))
    assert np.array_equal(outs[4][0], outs[10][0]) and np.array_equal(outs[4][1], outs[10][1])


def test_a_grey_model_sweeps_against_a_grey_reference(tmp_path, capsys):
    """One-channel models (the digits models are grey): samples are written as three equal channels, the
    paper's RGB layout, and so is the reference the sweep builds."""
    from conftest import tiny_config
    from guided.networks.checkpoints import build_network, export_weights
    cfg = tiny_config("diffusion", tmp_path / "run", "model.image_size=16", "data.image_size=16",
                      "model.in_channels=1", "data.channels=1")
    path = export_weights(tmp_path / "grey.pt", build_network("unet", cfg).state_dict(), kind="unet", cfg=cfg)
    out = tmp_path / "s"
    code, stdout, err = run(capsys, "--model", path, "--classifier", "none", "--sweep", "cfg_scale=1,2", "--out", out,
                            "--num-samples", "10", "--sampler", "ddim", "--steps", "2", "--device", "cpu")
    assert code == 0, err
    ref, _ = read_npz(out / "reference_digits_16px_3ch.npz")
    assert ref.shape == (1000, 16, 16, 3) and (ref == ref[..., :1]).all()
    samples = read_npz(out / "cfg_scale_2" / "seed_0" / "samples.npz")[0]
    assert samples.shape == (10, 16, 16, 3) and (samples == samples[..., :1]).all()
    results = json.loads((out / "results.json").read_text())
    assert [r["cfg_scale"] for r in results["summary"]] == [1, 2] and "judge_accuracy" in results["summary"][0]


def test_an_interrupted_sweep_evaluates_the_samples_it_has(tmp_path, capsys, monkeypatch):
    import guided.evaluation.sweeps as sweep_module  # the sweep engine, in the library
    out = tmp_path / "s"
    assert run(capsys, *FAST, "--scales", "1", "--out", out)[0] == 0
    (out / "results.json").unlink()  # killed after sampling, before the row was written
    monkeypatch.setattr(sweep_module, "generate", lambda *a, **k: pytest.fail("sampled again"))
    code, stdout, _ = run(capsys, *FAST, "--scales", "1", "--out", out)
    assert code == 0 and "scale=1 seed=0" in stdout
    record = json.loads((out / "scale_1" / "seed_0" / "settings.json").read_text())
    (out / "scale_1" / "seed_0" / "settings.json").write_text(json.dumps(dict(record, seed=5)))
    (out / "results.json").unlink()
    code, _, err = run(capsys, *FAST, "--scales", "1", "--out", out)
    assert code == 2 and "was drawn with other settings than this sweep's" in error_line(err)


def test_no_arguments_print_the_usage_and_start_nothing(tmp_path, capsys, monkeypatch):
    """`python -m guided.cli.sweep` alone once started a six-scale sweep into ./sweep."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys)
    assert code == 2 and err.startswith("usage: python -m guided.cli.sweep") and not list(tmp_path.iterdir())
    assert "error: the following arguments are required: --out" in err
    code, _, err = run(capsys, "--out", tmp_path / "s")
    assert code == 2 and "give the values to sweep: --scales" in error_line(err) and not list(tmp_path.iterdir())
