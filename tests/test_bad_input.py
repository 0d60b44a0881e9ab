"""Bad input: every wrong option, config, checkpoint, image or label is one `error:` line and a
non-zero exit, never a traceback. Each case is recorded into the fault report (fault_harness)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CLASSIFIER, TINY_TRAIN, TINY_UNET
from fault_harness import REPO, one_error_line, record_bad_input

TRAIN = TINY_UNET + TINY_TRAIN


def _main(command):
    if command == "sample_guided.py":
        from guided.cli.sample import main
    elif command == "train_diffusion.py":
        from guided.cli.train import main_diffusion as main
    elif command == "train_classifier.py":
        from guided.cli.train import main_classifier as main
    elif command == "python -m guided.cli.evaluate":
        from guided.cli.evaluate import main
    elif command == "python -m guided.cli.sweep":
        from guided.cli.sweep import main
    elif command == "python -m guided.cli.reference_batch":
        from guided.cli.reference_batch import main
    elif command == "python -m guided.cli.plots":
        from guided.cli.plots import main
    elif command == "guided-demo":
        from guided.cli.demo import main
    else:
        from guided.cli.conformance import main
    return main


def run(command, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = _main(command)(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, one_error_line(capsys.readouterr().err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Damaged and foreign files to feed the commands."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt").write_bytes(os.urandom(3000))
    good = d / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    (d / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"format": "something-else"}, d / "foreign.pt")
    (d / "notes.txt").write_text("hello\n")
    (d / "unknown_key.yaml").write_text("train:\n  batch_sise: 32\n")
    (d / "wrong_type.yaml").write_text("train:\n  batch_size: lots\n")
    (d / "broken.yaml").write_text("train: [unclosed\n")
    (d / "empty.yaml").write_text("")
    _damaged_weights(d)
    (d / "not_an_image.png").write_bytes(b"not a png at all")
    np.savez(d / "samples.npz", np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64))
    np.savez(d / "wrong_layout.npz", np.zeros((4, 8), np.float32))
    (d / "a_file").write_text("x")
    (d / "a_folder").mkdir()  # a folder where a file belongs (as root, no file can be made unreadable)
    (d / "empty_folder").mkdir()
    (d / "a_folder" / "x.txt").write_text("x")
    (d / "empty.npz").write_bytes(b"")
    (d / "empty.png").write_bytes(b"")
    # a trained tiny classifier and U-Net, for "checkpoint of another architecture"
    from guided.cli.train import main_classifier, main_diffusion
    assert main_classifier(TINY_CLASSIFIER + TINY_TRAIN + ["train.steps=1", "train.lr=3e-4",
                                                           f"train.out_dir={d / 'clf'}"]) == 0
    assert main_diffusion(TINY_UNET + TINY_TRAIN + ["train.steps=1", f"train.out_dir={d / 'unet'}"]) == 0
    return d


def _damaged_weights(d: Path) -> None:
    """The shipped models with one NaN / inf weight, and a 3-class classifier for the 10-class digits."""
    from guided.networks import checkpoints as ck
    from guided.generation.loading import SHIPPED
    from guided.config import load_config
    from guided.networks.unet import EncoderUNetModel

    for name, out, value in (("cond", "nan_model.pt", float("nan")), ("classifier", "inf_classifier.pt",
                                                                      float("inf"))):
        w = torch.load(SHIPPED / f"{name}.pt", weights_only=True)
        w["state_dict"]["input_blocks.1.0.in_layers.2.weight"][0, 0, 0, 0] = value
        torch.save(w, d / out)
    shipped = ck.load_trained(SHIPPED / "cond.pt")[1]  # the shipped model's image size, channels and noise process
    m = shipped.model
    cfg = load_config(None, TINY_CLASSIFIER + [f"classifier.image_size={m.image_size}",
                                               f"classifier.in_channels={m.in_channels}", "classifier.num_classes=3"])
    cfg.diffusion = shipped.diffusion
    ck.export_weights(d / "clf3.pt", EncoderUNetModel(cfg.classifier).state_dict(), kind="classifier", cfg=cfg)


def P(files, name):
    return str(files / name)


# (command, argv builder, what is wrong, expected part of the message)
S = "sample_guided.py"
STROKE = str(REPO / "docs" / "strokes" / "stroke_7.png")
SAMPLE = [
    (S, ["--num-samples", "abc"], "--num-samples abc", "argument --num-samples: invalid positive int value"),
    (S, ["--num-samples", "0"], "--num-samples 0", "argument --num-samples: invalid positive int value"),
    (S, ["--batch-size", "-2"], "--batch-size -2", "argument --batch-size: invalid positive int value"),
    (S, ["--seed", "-1"], "--seed -1", "argument --seed: invalid non-negative int value"),
    (S, ["--scale", "-1"], "--scale -1", "argument --scale: invalid non-negative float value"),
    (S, ["--scale", "nan"], "--scale nan", "argument --scale: invalid non-negative float value"),
    (S, ["--scales", "1,x"], "--scales 1,x", "argument --scales: invalid comma list"),
    (S, ["--cfg-scale", "big"], "--cfg-scale big", "argument --cfg-scale: invalid"),
    (S, ["--eta", "-0.5"], "--eta -0.5", "argument --eta: invalid non-negative float value"),
    (S, ["--sampler", "euler"], "--sampler euler", "argument --sampler: invalid choice"),
    (S, ["--precision", "fp8"], "--precision fp8", "argument --precision: invalid choice"),
    (S, ["--steps", "abc"], "--steps abc", "respacing 'abc': expected a step count"),
    (S, ["--steps", "0"], "--steps 0", "respacing '0': every section needs at least one step"),
    (S, ["--t0", "x"], "--t0 x", "argument --t0: invalid float value"),
    (S, ["--init-image", "{bad}/not_an_image.png", "--t0", "2"], "--t0 2", "--t0 must be in (0, 1]"),
    (S, ["--init-image", "{bad}/missing.png"], "--init-image missing.png", "no such image"),
    (S, ["--init-image", "{bad}/not_an_image.png"], "--init-image of a non-image", "is not an image PIL can read"),
    (S, ["--mask", "{bad}/not_an_image.png"], "--mask without --init-image", "--mask goes with --init-image"),
    (S, ["--init-image", STROKE, "--mask", "{bad}/missing.png"], "--mask missing.png", "no such image"),
    (S, ["--init-image", STROKE, "--mask", "{bad}/not_an_image.png"], "--mask of a non-image",
     "is not an image PIL can read"),
    (S, ["--init-image", STROKE, "--mask", "{bad}/empty.png"], "--mask: empty file", "is empty (0 bytes)"),
    (S, ["--init-image", "{bad}/a_folder"], "--init-image: a folder", "is a folder, not an image"),
    (S, ["--init-image", "{bad}/empty.png"], "--init-image: empty file", "is empty (0 bytes)"),
    (S, ["--classifier", "{bad}/missing.pt"], "--classifier missing.pt", "does not exist"),
    (S, ["--classifier", "{bad}/empty.pt"], "--classifier: empty file", "is empty (0 bytes)"),
    (S, ["--autoguide-scale", "2", "--autoguide", "{bad}/missing.pt"], "--autoguide missing.pt", "does not exist"),
    (S, ["--autoguide-scale", "2", "--autoguide", "{bad}/garbage.pt"], "--autoguide: random bytes",
     "is truncated or corrupt"),
    (S, ["--x0-scale", "2", "--x0-classifier", "{bad}/missing.pt"], "--x0-classifier missing.pt", "does not exist"),
    (S, ["--x0-scale", "2", "--x0-classifier", "{bad}/unet"], "--x0-classifier: a U-Net run", "does not hold"),
    (S, ["--model", "{bad}/empty_folder"], "--model: an empty folder", "empty_folder"),
    (S, ["--class", "12"], "--class 12 (10 classes)", "class index 12 is out of range"),
    (S, ["--class", "zebra"], "--class zebra", "class 'zebra' is not in this label map"),
    (S, ["--model", "{bad}/missing.pt"], "--model missing.pt", "does not exist"),
    (S, ["--model", "{bad}/empty.pt"], "--model: empty file", "is empty (0 bytes): copy, export or download it again"),
    (S, ["--model", "{bad}/garbage.pt"], "--model: random bytes", "is truncated or corrupt"),
    (S, ["--model", "{bad}/truncated.pt"], "--model: truncated file", "is truncated or corrupt"),
    (S, ["--model", "{bad}/foreign.pt"], "--model: a .pt of something else", "is neither a weights file"),
    (S, ["--model", "{bad}/clf"], "--model: a classifier run", "holds a noise-aware classifier, not a score model"),
    (S, ["--classifier", "{bad}/unet"], "--classifier: a U-Net run", "classifier"),
    (S, ["--adm-flags", "--bogus_flag 1", "--model", "{bad}/good.pt"], "--adm-flags with an unknown flag", "bogus"),
    (S, ["--device", "tpu9"], "--device tpu9", "is not a torch device"),
    (S, ["--out", "{bad}/a_file"], "--out: an existing file", "as the output folder"),
    (S, ["--frobnicate"], "an unknown option", "unrecognized arguments: --frobnicate"),
    (S, ["--steps", "1"], "--steps 1", "keeps a single step (timestep 0)"),
    (S, ["--sampler", "pc", "--steps", "quad25"], "--sampler pc --steps quad25", "takes a plain step count"),
    (S, ["--sampler", "ode", "--steps", "10"], "--sampler ode --steps 10", "--sampler ode chooses its own steps"),
    (S, ["--model", "ncsn", "--sampler", "langevin", "--steps", "10"], "--sampler langevin --steps 10",
     "--sampler langevin chooses its own steps"),
    (S, ["--seed", "99999999999999999999"], "--seed 99999999999999999999", "--seed 99999999999999999999 is out of"),
    (S, ["--scale", "1e30", "--sampler", "ddpm"], "--scale 1e30 --sampler ddpm (the samples come out NaN)",
     "came out NaN or infinite"),
    (S, ["--model", "{bad}/nan_model.pt"], "--model: weights holding a NaN",
     "tensor input_blocks.1.0.in_layers.2.weight holds NaN"),
    (S, ["--classifier", "{bad}/inf_classifier.pt"], "--classifier: weights holding an inf",
     "tensor input_blocks.1.0.in_layers.2.weight holds inf"),
    (S, ["--classifier", "{bad}/clf3.pt", "--class", "7"],
     "--class 7 guided by a 3-class classifier (10-class model)", "class 7 is outside the classifier's 3 classes"),
    (S, ["--model", "ncsn", "--classifier", "classifier", "--scale", "1", "--sampler", "pc"],
     "a VP classifier guiding the NCSN model",
     "the classifier cannot guide this model: it was trained on a VP chain"),
    (S, ["--model", "uncond", "--classifier", "ncsn_classifier", "--scale", "1"],
     "the NCSN ladder classifier guiding a VP model", "it was trained on an NCSN noise ladder, the model on a VP chain"),
    (S, ["--sampler", "dpm++3m", "--eta", "0.5"], "--eta on a sampler without noise", "has no setting 'eta'"),
    (S, ["--sampler", "dpm++2m-sde", "--sampler-arg", "churn=40"], "--sampler-arg churn on dpm++2m-sde",
     "has no setting 'churn'; it takes eta"),
    (S, ["--sampler", "ddim", "--sampler-arg", "eta=-1"], "--sampler-arg eta=-1", "must lie in [0, inf], not -1"),
    (S, ["--sampler", "edm", "--sampler-arg", "s_tmin=10", "--sampler-arg", "s_tmax=1"], "edm's s_tmin above s_tmax",
     "is above its s_tmax"),
    (S, ["--sampler", "dpm++2m-sde", "--sampler-arg", "percentile=50"], "a percentile of 50 (not a share)",
     "(99.5% is 0.995), not 50"),
    (S, ["--no-clip", "--sampler-arg", "threshold=static"], "--no-clip with threshold=static",
     "threshold=static and --no-clip contradict each other"),
    (S, ["--guide", "nothing=1"], "--guide of a term nobody registered", "no registered guidance term of that name"),
]
T, C = "train_diffusion.py", "train_classifier.py"
TRAINING = [
    (T, ["--config", "{bad}/missing.yaml"], "--config missing.yaml", "does not exist"),
    (T, ["--config", "{bad}/a_folder"], "--config: a folder", "a_folder"),
    (T, ["data.kind=imagenet", "data.root={bad}/notes.txt"], "data.root: a file", "notes.txt"),
    (T, ["data.kind=imagenet", "data.root={bad}/empty_folder"], "data.root: an empty folder", "empty_folder"),
    (C, ["--config", "{bad}/missing.yaml"], "--config missing.yaml", "does not exist"),
    (C, ["--config", "{bad}/empty.yaml"], "an empty config file", "is empty"),
    (C, ["data.kind=imagenet", "data.root={bad}/missing"], "data.root that does not exist", "does not exist"),
    (T, ["--config", "{bad}/unknown_key.yaml"], "config with an unknown key", "batch_sise"),
    (T, ["--config", "{bad}/wrong_type.yaml"], "config with a wrong type", "batch_size"),
    (T, ["--config", "{bad}/broken.yaml"], "config that is not YAML", "cannot read config"),
    (T, ["train.batch_size=lots"], "override train.batch_size=lots", "train.batch_size"),
    (T, ["train.bogus=1"], "override of an unknown key", "bogus"),
    (T, ["train.steps"], "override without =", "is not of the form key=value"),
    (T, ["train.steps=-5"], "train.steps=-5",
     "train.steps must be 0 (just save the initial weights) or more, not -5"),
    (T, ["train.lr=-1"], "train.lr=-1", "train.lr must be 0 or more, not -1.0"),
    (T, ["train.batch_size=0"], "train.batch_size=0", "batch"),
    (T, ["train.save_every=0"], "train.save_every=0", "train.save_every must be at least 1, not 0"),
    (T, ["train.mixed_precision=fp8"], "train.mixed_precision=fp8", "mixed_precision"),
    (T, ["train.objective=gan"], "train.objective=gan", "train.objective must be one of"),
    (T, ["model.channel_mult=[1,x]"], "model.channel_mult=[1,x]", "channel_mult"),
    (T, ["model.num_head_channels=7"], "model.num_head_channels=7", "cannot build"),
    (T, ["data.kind=lmdb"], "data.kind=lmdb", "data.kind must be one of"),
    (T, ["data.kind=folder", "data.root={bad}/nowhere"], "data.root that does not exist", "does not exist"),
    (T, ["data.classes=[zebra]"], "data.classes=[zebra] (digits)", "zebra"),
    (T, ["data.image_size=16"], "data.image_size != model.image_size", "set them equal"),
    (T, ["--resume", "train.out_dir={bad}/clf"], "--resume onto a classifier run", "not a unet one"),
    (T, ["train.out_dir={bad}/unet"], "a run folder that has checkpoints, no --resume", "pass --resume"),
    (T, ["--frobnicate"], "an unknown option", "unrecognized arguments: --frobnicate"),
    (T, ["--config", "{bad}/empty.yaml"], "an empty config file", "is empty"),
    (T, ["diffusion.steps=1"], "diffusion.steps=1", "diffusion.steps must be at least 2, got 1"),
    (T, ["model.image_size=17", "data.image_size=17"], "model.image_size=17 (and data.image_size=17)",
     "image_size 17 is not a multiple of 2"),
    (T, ["train.seed=99999999999999999999"], "train.seed=99999999999999999999", "train.seed must be in"),
    (C, ["train.schedule_sampler=loss-second-moment"], "classifier with a loss-aware sampler",
     "train.schedule_sampler=uniform"),
    (C, ["--resume", "train.out_dir={bad}/unet"], "--resume onto a U-Net run", "not a classifier one"),
    (C, ["classifier.pool=max"], "classifier.pool=max", "pool"),
]
E, W, K = "python -m guided.cli.evaluate", "python -m guided.cli.sweep", "python -m guided.cli.conformance"
R, P, D = "python -m guided.cli.reference_batch", "python -m guided.cli.plots", "guided-demo"
OTHERS = [
    (E, ["{bad}/missing.npz", "{bad}/samples.npz", "--features", "digits"], "samples file that does not exist",
     "missing.npz"),
    (E, ["{bad}/notes.txt", "{bad}/samples.npz", "--features", "digits"], "samples file that is not an npz",
     "notes.txt"),
    (E, ["{bad}/wrong_layout.npz", "{bad}/samples.npz", "--features", "digits"], "npz without uint8 images",
     "wrong_layout.npz"),
    (E, ["{bad}/samples.npz", "{bad}/samples.npz", "--batch-size", "0"], "--batch-size 0",
     "batch size must be a positive integer, got 0"),
    (E, ["{bad}/samples.npz", "{bad}/samples.npz", "--batch-size", "x"], "--batch-size x",
     "argument --batch-size: invalid int value"),
    (E, ["{bad}/samples.npz", "{bad}/samples.npz", "--features", "vgg"], "--features vgg", "invalid choice"),
    (E, ["{bad}/samples.npz", "{bad}/samples.npz", "--inception-weights", "{bad}/garbage.pt", "--no-cache"],
     "--inception-weights of random bytes", "garbage.pt"),
    (E, ["{bad}/samples.npz"], "a missing argument", "reference"),
    (E, ["{bad}/a_folder", "{bad}/samples.npz", "--features", "digits"], "samples: a folder", "a_folder"),
    (E, ["{bad}/empty.npz", "{bad}/samples.npz", "--features", "digits"], "samples file that is empty", "empty.npz"),
    (E, ["{bad}/samples.npz", "{bad}/missing.npz", "--features", "digits"], "reference file that does not exist",
     "missing.npz"),
    (E, ["{bad}/samples.npz", "{bad}/notes.txt", "--features", "digits"], "reference file that is not an npz",
     "notes.txt"),
    (W, ["--scales", "1", "--reference", "{bad}/notes.txt", "--out", "{bad}/sweep2"], "--reference: not an npz",
     "notes.txt"),
    (W, ["--scales", "1", "--reference", "{bad}/empty.npz", "--out", "{bad}/sweep3"], "--reference: empty file",
     "empty.npz"),
    (W, ["--scales", "1", "--reference", "{bad}/a_folder", "--out", "{bad}/sweep4"], "--reference: a folder",
     "a_folder"),
    (W, ["--scales", "1", "--out", "{bad}/a_file"], "--out: an existing file", "a_file"),
    (R, ["{bad}/missing", "--image-size", "8", "--out", "{bad}/r.npz"], "DATA folder that does not exist",
     "missing"),
    (R, ["{bad}/notes.txt", "--image-size", "8", "--out", "{bad}/r.npz"], "DATA: a file", "notes.txt"),
    (R, ["{bad}/empty_folder", "--image-size", "8", "--out", "{bad}/r.npz"], "DATA: an empty folder",
     "empty_folder"),
    (R, ["digits", "--image-size", "8", "--out", "{bad}/a_folder"], "--out: a folder", "a_folder"),
    (P, ["{bad}/missing", "--out", "{bad}/t.png"], "a sweep folder that does not exist", "missing"),
    (P, ["{bad}/notes.txt", "--out", "{bad}/t.png"], "a file, not a sweep folder", "notes.txt"),
    (P, ["{bad}/empty_folder", "--out", "{bad}/t.png"], "a folder without results", "empty_folder"),
    (K, ["{bad}/a_folder"], "a folder", "a_folder"),
    (K, ["{bad}/empty.pt"], "an empty file", "empty.pt"),
    (D, ["--sweep", "{bad}/missing"], "--sweep folder that does not exist", "missing"),
    (D, ["--sweep", "{bad}/notes.txt"], "--sweep: a file", "notes.txt"),
    (D, ["--model", "{bad}/missing.pt"], "--model missing.pt", "does not exist"),
    (W, ["--scales", "1,-2"], "--scales 1,-2", "argument --scales: invalid comma list"),
    (W, ["--num-samples", "0"], "--num-samples 0", "argument --num-samples: invalid positive int value"),
    (W, ["--scales", "1", "--reference", "{bad}/missing.npz", "--out", "{bad}/sweep"], "--reference missing.npz", "does not exist"),
    (W, ["--features", "vgg"], "--features vgg", "invalid choice"),
    (K, ["{bad}/missing.pt"], "a file that does not exist", "missing.pt"),
    (K, ["{bad}/garbage.pt"], "a file of random bytes", "garbage.pt"),
    (K, ["{bad}/foreign.pt"], "a .pt that is not a conformance file", "foreign.pt"),
    (K, [], "no file", "files"),
]
CASES = SAMPLE + TRAINING + OTHERS


def _argv(command, argv, files):
    argv = [a.replace("{bad}", str(files)) for a in argv]
    if command.startswith("train_"):  # the tiny run, unless the case points elsewhere
        base = (TINY_UNET if command == T else TINY_CLASSIFIER + ["train.lr=3e-4"]) + TINY_TRAIN
        if not any(a.startswith("train.out_dir=") for a in argv):
            base = base + [f"train.out_dir={files / 'runs' / str(abs(hash(tuple(argv))))}"]
        options = [a for a in argv if a.startswith("--")]
        flags = [a for a in argv if not a.startswith("--")]
        if "--config" in options:  # its value is the next item
            i = argv.index("--config")
            return argv[i: i + 2] + base
        return options + base + flags
    if command == S or command == W:
        base = ["--num-samples", "2", "--batch-size", "2", "--steps", "2", "--sampler", "ddim", "--device", "cpu",
                "--out", str(files / "out" / str(abs(hash(tuple(argv)))))]
        if command == W:
            base = base[:-2] + ["--out", str(files / "sweep" / str(abs(hash(tuple(argv)))))]
        return base + argv
    return argv


@pytest.mark.parametrize("command,argv,given,expected", CASES, ids=[f"{c.split()[-1]}:{g}" for c, _, g, _ in CASES])
def test_bad_option_is_one_error_line(files, capsys, command, argv, given, expected):
    code, line = run(command, _argv(command, argv, files), capsys)
    assert code not in (0, None), line
    if expected is not None:
        assert expected in line, line
    record_bad_input(f"{command} {given}", command, given, code, line.replace(str(files), "…"))


# -- damaged checkpoints, label files and class names ----------------------------------------------
@pytest.fixture(scope="module")
def damaged_runs(files):
    import shutil

    d = files / "damaged"
    for name, damage in (("only_empty", b""), ("only_garbage", os.urandom(5000))):
        (d / name).mkdir(parents=True)
        (d / name / "ckpt-0000004.pt").write_bytes(damage)
    trunc = d / "truncated_newest"
    shutil.copytree(files / "unet", trunc)
    good = trunc / "ckpt-0000001.pt"
    (trunc / "ckpt-0000002.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    bad_labels = d / "bad_labels"
    shutil.copytree(files / "unet", bad_labels)
    for f in ("model.pt", "ema.pt"):
        (bad_labels / f).unlink()
    (bad_labels / "label_map.json").write_text("{not json")
    _image_folder(d / "imgs")
    return d


DAMAGED = [
    (T, ["--resume", "train.out_dir={damaged}/only_empty"], "--resume: the only checkpoint is 0 bytes",
     "no readable checkpoint in"),
    (T, ["--resume", "train.out_dir={damaged}/only_garbage"], "--resume: the only checkpoint is random bytes",
     "no readable checkpoint in"),
    (S, ["--model", "{damaged}/bad_labels", "--classifier", "none"], "--model: a run whose label_map.json is broken",
     "is not valid JSON"),
    (T, ["data.kind=imagenet", "data.root={damaged}/imgs", "data.classes=[zebra]"],
     "data.classes naming a missing class",
     "class 'zebra' is not in"),
    (C, ["data.kind=imagenet", "data.root={damaged}/imgs", "data.val_root={damaged}/nowhere"],
     "data.val_root that does not exist", "set data.val_root"),
]


@pytest.mark.parametrize("command,argv,given,expected", DAMAGED, ids=[g for _, _, g, _ in DAMAGED])
def test_damaged_checkpoints_and_labels_are_one_error_line(files, damaged_runs, capsys, command, argv, given,
                                                            expected):
    argv = [a.replace("{damaged}", str(damaged_runs)) for a in argv]
    code, line = run(command, _argv(command, argv, files), capsys)
    assert code == 2 and expected in line, line
    record_bad_input(f"{command} {given}", command, given, code, line.replace(str(files), "…"))


def test_a_truncated_newest_checkpoint_is_skipped_on_resume(files, damaged_runs, capsys):
    run_dir = damaged_runs / "truncated_newest"
    argv = TINY_UNET + TINY_TRAIN + ["train.steps=2", f"train.out_dir={run_dir}", "--resume"]
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint.*ckpt-0000002.pt is truncated or corrupt"):
        code = _main(T)(argv)
    out = capsys.readouterr().out
    assert code == 0 and f"resumed from {run_dir / 'ckpt-0000001.pt'} at step 1" in out
    record_bad_input("train_diffusion.py --resume: newest checkpoint truncated", T,
                     "--resume: newest checkpoint truncated, an older one intact", code,
                     "warning: skipping unreadable checkpoint …/ckpt-0000002.pt; resumed from ckpt-0000001.pt")


def test_more_samples_than_the_disk_holds_are_refused_before_memory_grows(files, capsys):
    """`--num-samples 1000000000 --steps 2` once planned every label up front (6 GB in a minute, nothing
    written): labels and seeds are now made per batch, and what cannot fit on the disk is refused."""
    out = files / "huge" / "out"
    n = 10**9 if shutil.disk_usage(files).free < 2 * 10**9 * 16 * 16 * 3 else 10**13  # more than the disk holds
    tracemalloc.start()
    try:
        code, line = run(S, ["--num-samples", str(n), "--steps", "2", "--device", "cpu", "--out", str(out)], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 2 and line.startswith("error: the samples need about ") and line.endswith(
        "lower --num-samples or choose another --out"), line
    assert peak < 100 * 2**20 and not out.parent.exists(), peak
    record_bad_input(f"{S} --num-samples {n}", S, f"--num-samples {n} --steps 2 (more than the disk holds)", code,
                     "`" + line.replace(str(files), "…").split(" but ")[0] + " but …/huge has N GB free: lower "
                     f"--num-samples or choose another --out`; Python's memory peak {peak / 2**20:.0f} MB")


# -- images in the data folder ---------------------------------------------------------------------
def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rgb = lambda: Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))  # noqa: E731
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            rgb().save(root / cls / f"ok{i}.png")
    rgb().convert("CMYK").save(root / "a" / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (12, 12))).astype(np.uint16)).save(root / "a" / "sixteen.png")
    rgb().convert("L").save(root / "b" / "grey.png")
    rgb().convert("RGBA").save(root / "b" / "rgba.png")
    (root / "b" / "zero.png").write_bytes(b"")
    full = root / "a" / "ok0.png"
    (root / "a" / "truncated.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return root


@pytest.mark.parametrize("in_memory", [True, False])
def test_odd_images_are_converted_and_broken_ones_skipped_and_counted(tmp_path, in_memory):
    import warnings

    from guided.data import build_dataset

    root = _image_folder(tmp_path / "imgs")
    modes = {p.name: Image.open(p).mode for p in root.rglob("*") if p.is_file() and p.stat().st_size
             and p.name != "truncated.png"}
    assert {modes["cmyk.jpg"], modes["sixteen.png"], modes["grey.png"], modes["rgba.png"]} == {"CMYK", "I;16", "L",
                                                                                               "RGBA"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(dict(kind="imagenet", root=str(root), image_size=8, in_memory=in_memory,
                                random_flip=False))
        items = [ds[i] for i in range(len(ds))]
    names = sorted(Path(f).name for f in ds.skipped_files)
    assert names == ["truncated.png", "zero.png"] and ds.skipped == 2
    assert all(x.shape == (3, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1 for x, _ in items)
    converted = {Path(f).name for f in ds.files} & {"cmyk.jpg", "sixteen.png", "grey.png", "rgba.png"}
    assert len(converted) == 4
    warned = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(warned) == 2
    record_bad_input(f"data folder images (in_memory={in_memory})", "train_diffusion.py",
                     f"data folder with truncated, zero-byte, CMYK, 16-bit, greyscale and RGBA images "
                     f"(in_memory={in_memory})", 0,
                     "CMYK, 16-bit, greyscale, RGBA converted to RGB; truncated and zero-byte skipped with a warning "
                     "naming each and counted (dataset.skipped = 2); training runs on the rest")


def test_training_on_a_folder_of_odd_images_runs(tmp_path, capsys):
    root = _image_folder(tmp_path / "imgs")
    argv = TINY_UNET + TINY_TRAIN + ["data.kind=folder", "data.kind=imagenet", f"data.root={root}",
                                     "train.batch_size=4", "train.steps=2", f"train.out_dir={tmp_path / 'run'}"]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert _main(T)(argv) == 0


# -- a few real processes: exit status and no traceback ---------------------------------------------
def test_real_processes_exit_2_with_one_line(files):
    cases = [
        ([str(REPO / "sample_guided.py"), "--model", str(files / "truncated.pt"), "--out", str(files / "p1")],
         "is truncated or corrupt"),
        ([str(REPO / "train_diffusion.py"), "--config", str(files / "unknown_key.yaml")], "batch_sise"),
        (["-m", "guided.cli.evaluate", str(files / "notes.txt"), str(files / "samples.npz")], "notes.txt"),
        (["-m", "guided.cli.conformance", str(files / "garbage.pt")], "garbage.pt"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *argv], cwd=files, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in cases]
    for (argv, expected), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        line = one_error_line(err)
        assert proc.returncode == 2 and expected in line, (argv, err)


# -- options and overrides in any order (both trainers) ---------------------------------------------
@pytest.mark.parametrize("command", [T, C])
def test_trainer_options_and_overrides_mix_in_any_order(tmp_path, capsys, command):
    """`--config digits.yaml train.out_dir=X --resume train.steps=2` was refused as 'unrecognized
    arguments: train.steps=2' after accepting the first override."""
    config = "digits.yaml" if command == T else "digits_classifier.yaml"
    argv = ["--config", config, f"train.out_dir={tmp_path / 'x'}", "--dry-run", "train.steps=2", "--resume",
            "train.batch_size=3"]
    code = _main(command)(argv)
    printed = capsys.readouterr().out
    assert code == 0 and "steps: 2\n" in printed and "batch_size: 3\n" in printed and str(tmp_path / "x") in printed


# -- defaults that need files nobody has ------------------------------------------------------------
def _no_weights(monkeypatch, tmp_path):
    for var in ("GUIDED_INCEPTION_WEIGHTS", "GUIDED_DINOV2_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_reference_batch_of_a_folder_runs_without_inception_weights(tmp_path, capsys, monkeypatch):
    from guided.cli.reference_batch import main

    _no_weights(monkeypatch, tmp_path)
    root = _image_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning):
        code = main([str(root), "--image-size", "8", "--num-samples", "4", "--out", str(tmp_path / "ref.npz")])
    err = capsys.readouterr().err
    assert code == 0 and (tmp_path / "ref.npz").is_file() and "without cached statistics" in err, err


def test_evaluate_picks_the_digits_judge_for_digits_and_names_the_way_out_otherwise(files, tmp_path, capsys,
                                                                                    monkeypatch):
    from guided.cli.evaluate import main
    from guided.evaluation.judge import digits_data

    _no_weights(monkeypatch, tmp_path)
    digits = np.repeat(digits_data(16)[0][:40], 3, axis=-1)
    np.savez(tmp_path / "digits.npz", digits, np.zeros(40, np.int64))
    code = main([str(tmp_path / "digits.npz"), str(tmp_path / "digits.npz"), "--no-cache"])
    out = capsys.readouterr()
    assert code == 0 and "digits16 features" in out.out, out
    colour = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / "colour.npz", colour)
    code, line = run("python -m guided.cli.evaluate", [str(tmp_path / "colour.npz")] * 2, capsys)
    assert code == 2 and "--features digits" in line and "not found" in line, line
    record_bad_input("evaluate: default features without Inception weights", "python -m guided.cli.evaluate",
                     "colour images, no --features, no Inception weights anywhere", code,
                     line.replace(str(tmp_path), "…"))
