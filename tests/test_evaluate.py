"""End to end: the digits judge, the npz helpers, evaluate() and its command line."""

import os
import subprocess
import sys

import numpy as np
import pytest

import guided.evaluation.evaluate as ev
from guided.errors import GuidedError
from guided.cli.evaluate import main
from guided.evaluation.evaluate import NpzImages, evaluate, read_npz, stats_cache_path, write_npz
from guided.evaluation.features import INCEPTION_FILENAME, find_inception_weights, get_extractor
from guided.evaluation.judge import digits_data, load_judge, split_indices, train_judge


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Everything here is tiny; on a busy 2-core machine extra torch threads only spin."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_data(16)
    train, heldout = split_indices()
    return images, labels, train, heldout


@pytest.fixture()
def npzs(tmp_path, digits):
    """reference: 600 training digits (grey); samples: the 297 held-out digits as RGB, labelled."""
    images, labels, train, heldout = digits
    ref = write_npz(tmp_path / "ref.npz", images[train[:600]], labels[train[:600]])
    smp = write_npz(tmp_path / "samples.npz", np.repeat(images[heldout], 3, -1), labels[heldout])
    return smp, ref


def _one_line_error(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


# ---- the judge -------------------------------------------------------------------------

def test_judge_heldout_accuracy_is_at_least_95_percent(digits):
    images, labels, _, heldout = digits
    judge = load_judge(16)
    assert judge.heldout_accuracy >= 0.95
    assert judge.accuracy(images[heldout], labels[heldout]) >= 0.95


def test_judge_trains_deterministically_from_scratch():
    judge = train_judge(8, epochs=20)
    assert judge.heldout_accuracy >= 0.95
    assert train_judge(8, epochs=1).cache_key == train_judge(8, epochs=1).cache_key


def test_judge_accepts_grey_rgb_and_float_images(digits):
    images, _, _, heldout = digits
    grey = images[heldout[:64]]
    judge = load_judge(16)
    as_float = grey.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    p = judge.predict(grey)
    assert (judge.predict(np.repeat(grey, 3, -1)) == p).all()
    assert (judge.predict(grey[..., 0]) == p).all()
    assert (judge.predict(np.repeat(as_float, 3, 1)) == p).all()
    feats = judge.extract(grey)
    assert feats["pool"].shape == (64, 64) and feats["spatial"].shape == (64, 128)
    np.testing.assert_allclose(feats["probs"].sum(1), 1.0)


def test_judge_rejects_other_image_sizes():
    with pytest.raises(GuidedError, match="load_judge") as e:
        load_judge(16).predict(np.zeros((2, 32, 32, 3), np.uint8))
    _one_line_error(e)


# ---- npz helpers -----------------------------------------------------------------------

def test_write_and_read_npz_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "sub" / "x.npz", images, [0, 1, 2, 3, 4])
    got, labels = read_npz(path)
    assert (got == images).all() and labels.tolist() == [0, 1, 2, 3, 4]
    assert read_npz(write_npz(tmp_path / "y.npz", images))[1] is None
    with pytest.raises(GuidedError):
        write_npz(tmp_path / "z.npz", images.astype(np.float32))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_streamed_batches_equal_the_array(tmp_path, save):
    images = np.random.default_rng(1).integers(0, 256, (10, 3, 5, 1), dtype=np.uint8)
    save(tmp_path / "a.npz", images)
    batches = list(NpzImages(tmp_path / "a.npz").batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert (np.concatenate(batches) == images).all()


# ---- evaluate ---------------------------------------------------------------------------

def test_evaluate_digits_end_to_end(npzs, tmp_path):
    smp, ref = npzs
    res = evaluate(smp, ref, "digits", progress=False)
    assert res["num_samples"] == 297 and res["num_reference"] == 600
    assert res["judge_accuracy"] >= 0.95
    assert 0 < res["fid"] < 20 and 0 < res["sfid"] < 20
    assert res["precision"] > 0.7 and res["recall"] > 0.7 and res["inception_score"] > 8
    assert stats_cache_path(ref, load_judge(16)).is_file()
    noise = np.random.default_rng(0).integers(0, 256, (100, 16, 16, 3), dtype=np.uint8)
    bad = evaluate(write_npz(tmp_path / "noise.npz", noise), ref, "digits", progress=False)
    assert bad["fid"] > 10 * res["fid"] and bad["precision"] < 0.1 and "judge_accuracy" not in bad


def test_evaluate_reference_against_itself(npzs):
    _, ref = npzs
    res = evaluate(ref, ref, "digits", progress=False)
    assert abs(res["fid"]) < 1e-6 and abs(res["sfid"]) < 1e-6
    assert res["precision"] == 1.0 and res["recall"] == 1.0


def test_reference_cache_is_reused_until_the_file_changes(npzs, monkeypatch):
    smp, ref = npzs
    calls = []
    real = ev.compute_features
    monkeypatch.setattr(ev, "compute_features", lambda *a, **kw: calls.append(kw.get("desc")) or real(*a, **kw))
    evaluate(smp, ref, "digits", progress=False)
    evaluate(smp, ref, "digits", progress=False)
    os.utime(ref, ns=(1, 1))  # a changed mtime invalidates the cache
    evaluate(smp, ref, "digits", progress=False)
    assert [c for c in calls if c == "reference features"] == ["reference features"] * 2


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_bad_inputs_are_one_line_errors(npzs, tmp_path):
    smp, ref = npzs
    u8 = np.zeros((10, 16, 16, 3), np.uint8)
    cases = {
        "differ in size": (write_npz(tmp_path / "big.npz", np.zeros((10, 32, 32, 3), np.uint8)), ref),
        "0 images": (_save(tmp_path / "empty.npz", arr_0=np.zeros((0, 16, 16, 3), np.uint8)), ref),
        "no arr_0": (_save(tmp_path / "noarr.npz", images=u8), ref),
        "needs at least 4": (smp, write_npz(tmp_path / "tiny.npz", u8[:3])),
        "uint8": (_save(tmp_path / "float.npz", arr_0=u8.astype(np.float32)), ref),
        "not a zip": (str(tmp_path / "junk.npz"), ref),
        "no such file": (str(tmp_path / "missing.npz"), ref),
        "one integer label": (_save(tmp_path / "lab.npz", arr_0=u8, arr_1=np.zeros(3, int)), ref),
    }
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    for expected, (s, r) in cases.items():
        with pytest.raises(GuidedError) as e:
            evaluate(s, r, "digits", progress=False)
        assert expected in _one_line_error(e), expected


# ---- Inception weights -------------------------------------------------------------------

def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("GUIDED_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(GuidedError) as e:
        get_extractor("inception")
    msg = _one_line_error(e)
    assert INCEPTION_FILENAME in msg and str(tmp_path / ".cache" / "guided") in msg
    assert "github.com/toshas/torch-fidelity/releases" in msg and "--inception-weights" in msg
    monkeypatch.setenv("GUIDED_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(GuidedError, match="nope.pth"):
        find_inception_weights()
    (tmp_path / "guided-dir").mkdir()
    target = tmp_path / "guided-dir" / INCEPTION_FILENAME
    target.write_bytes(b"garbage")
    assert find_inception_weights(tmp_path / "guided-dir") == str(target)
    with pytest.raises(GuidedError, match="could not load Inception weights"):
        get_extractor("inception", inception_weights=str(target))


def test_inception_features_have_the_evaluator_shapes(tmp_path, monkeypatch):
    # Random weights stand in for the real file (not available here): checks the plumbing,
    # the mixed_6/conv hook (7 x 17 x 17 = 2023) and that no download is attempted.
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as tfi
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    torch.save({}, tmp_path / INCEPTION_FILENAME)
    ext = get_extractor("inception", inception_weights=str(tmp_path), device="cpu")
    out = ext.extract(np.zeros((2, 16, 16, 1), np.uint8))
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023)
    assert out["probs"].shape == (2, 1008)
    np.testing.assert_allclose(out["probs"].sum(1), 1.0)


# ---- command line -------------------------------------------------------------------------

def test_cli_prints_results_and_json(npzs, tmp_path, capsys):
    smp, ref = npzs
    assert main([smp, ref, "--features", "digits", "--json", str(tmp_path / "r.json")]) == 0
    assert "FID: " in capsys.readouterr().out
    assert '"precision"' in (tmp_path / "r.json").read_text()


def test_cli_bad_input_is_one_error_line_and_exit_2(npzs, tmp_path, capsys):
    smp, _ = npzs
    _save(tmp_path / "noarr.npz", images=np.zeros((5, 16, 16, 3), np.uint8))
    assert main([smp, str(tmp_path / "noarr.npz"), "--features", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "arr_0" in err


def test_cli_as_a_program_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "guided.cli.evaluate", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: no such file") and "\n" not in proc.stderr.strip()


# ---- honest counts, warnings, several sample files ----------------------------------------

def test_every_metric_is_printed_with_its_sample_count(npzs, capsys):
    smp, ref = npzs
    assert main([smp, ref, "--features", "digits"]) == 0
    out = capsys.readouterr().out
    assert "FID: " in out and "(297 samples, 600 reference)" in out
    assert "Inception Score: " in out and "(297 samples)" in out
    assert "Judge accuracy: " in out and "(297 labelled samples)" in out
    assert "Precision: " in out and "(297 samples, 600 reference, k=3)" in out


def test_fid_from_few_samples_warns(npzs, tmp_path, digits, capsys):
    """As found: FID from 20 samples was printed without a word that it is meaningless."""
    images, labels, _, heldout = digits
    _, ref = npzs
    few = write_npz(tmp_path / "few.npz", images[heldout[:20]], labels[heldout[:20]])
    res = evaluate(few, ref, "digits", progress=False)
    # the judge's pool features have 64 dimensions: 20 samples cannot even fill the covariance
    assert any(w.startswith("FID from 20 samples (fewer than its 64 feature dimensions") for w in res["warnings"])
    assert any(w.startswith("FID from 600 reference images (under 1,000)") for w in res["warnings"])
    assert any("sFID from 20 samples (fewer than its 128 feature dimensions" in w for w in res["warnings"])
    more = write_npz(tmp_path / "more.npz", images[heldout[:200]], labels[heldout[:200]])
    assert any(w.startswith("FID from 200 samples (under 1,000)")
               for w in evaluate(more, ref, "digits", progress=False)["warnings"])
    assert main([few, ref, "--features", "digits"]) == 0
    err = capsys.readouterr().err
    assert "warning: FID from 20 samples" in err


def test_labels_outside_the_judges_classes_warn_instead_of_scoring_zero(npzs, tmp_path, digits, capsys):
    """As found: an unconditional model's samples (label -1) were reported with accuracy 0.0."""
    images, labels, _, heldout = digits
    _, ref = npzs
    unlabelled = write_npz(tmp_path / "u.npz", images[heldout[:50]], np.full(50, -1))
    res = evaluate(unlabelled, ref, "digits", progress=False)
    assert "judge_accuracy" not in res
    assert any("50 of 50 sample labels are outside the judge's 10 classes (e.g. -1)" in w for w in res["warnings"])
    mixed_labels = labels[heldout[:50]].copy()
    mixed_labels[:10] = 207  # an ImageNet class
    mixed = write_npz(tmp_path / "m.npz", images[heldout[:50]], mixed_labels)
    res = evaluate(mixed, ref, "digits", progress=False)
    assert res["num_labelled"] == 40
    assert res["judge_accuracy"] == load_judge(16).accuracy(images[heldout[10:50]], labels[heldout[10:50]])
    assert main([unlabelled, ref, "--features", "digits"]) == 0
    captured = capsys.readouterr()
    assert "Judge accuracy" not in captured.out and "outside the judge's 10 classes" in captured.err


def test_several_sample_files_give_mean_std_min_max(npzs, tmp_path, digits, capsys):
    images, labels, train, heldout = digits
    _, ref = npzs
    parts = [heldout[i * 90:(i + 1) * 90] for i in range(3)]
    files = [write_npz(tmp_path / f"s{i}.npz", images[p], labels[p]) for i, p in enumerate(parts)]
    single = [evaluate(f, ref, "digits", progress=False)["fid"] for f in files]
    assert main([*files, ref, "--features", "digits", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    import json
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]["fid"]
    assert summary["mean"] == pytest.approx(np.mean(single)) and summary["min"] == pytest.approx(min(single))
    assert summary["std"] == pytest.approx(np.std(single, ddof=1)) and summary["n"] == 3
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert {"mean", "std", "min", "max"} <= set(rows) and all(f in rows for f in files)
    assert rows[files[0]][1] == "90"  # the sample count column
