"""The trainers on the digits data: a few steps, two processes, exact resume, faults, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided import checkpoints as ck
from guided.cli.train import main_classifier, main_diffusion
from guided.errors import GuidedError
from guided.train_classifier_loop import train_classifier
from guided.train_diffusion_loop import DiffusionTrainer, train_diffusion

from conftest import TINY_CLASSIFIER, TINY_TRAIN, TINY_UNET, tiny_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"diffusion": train_diffusion, "classifier": train_classifier}


def same_weights(a, b) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusion_trainer_writes_a_run_folder(tiny):
    cfg = tiny("diffusion")
    trainer = train_diffusion(cfg)
    out = Path(cfg.train.out_dir)
    assert trainer.status == "done" and trainer.step == 4
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "label_map.json", "ckpt-0000002.pt", "ckpt-0000004.pt", "model.pt", "ema.pt"} <= names
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "vb", "loss_q0", "images_per_s", "bad_steps"} <= logs[-1].keys()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    model, run_cfg, labels = ck.load_trained(out, which="ema")
    assert run_cfg.model.num_classes == 10 and labels.keys[3] == "3" and not model.training


def test_classifier_trainer_reports_heldout_accuracy_per_quarter(tiny):
    trainer = train_classifier(tiny("classifier"))
    ev = trainer.last_eval
    assert {f"val_acc@1_q{q}" for q in range(4)} <= ev.keys() and "val_acc@5" in ev
    assert all(0 <= ev[f"val_acc@1_q{q}"] <= 1 for q in range(4))
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(3e-4 * (1 - 3 / 4))  # annealed, set before step 4


@pytest.mark.parametrize("kind, extra", [
    ("diffusion", ("model.dropout=0.1", "train.label_dropout=0.2", "train.microbatch=3")),
    ("diffusion", ("train.schedule_sampler=loss-second-moment",)),
    ("classifier", ()),
])
def test_interrupted_then_resumed_run_reaches_the_same_weights(tiny, kind, extra):
    extra = ("train.steps=6", "train.save_every=100", *extra)
    whole = TRAIN[kind](tiny(kind, *extra))
    cut = tiny(kind, *extra)
    assert TRAIN[kind](cut, stop_after=4).status == "stopped"
    resumed = TRAIN[kind](cut, resume=True)
    assert resumed.step == 6 and same_weights(whole, resumed)
    assert all(torch.equal(x, y) for r in whole.ema for x, y in zip(whole.ema[r], resumed.ema[r]))


@pytest.mark.parametrize("objective", ["vp_dsm", "ncsn"])
def test_score_matching_objectives_train(tiny, objective):
    cfg = tiny("diffusion", f"train.objective={objective}", "model.learn_sigma=false", "diffusion.variance=fixed_small",
               "train.ncsn_levels=10", "train.ncsn_sigma_max=1.0", "train.label_dropout=0.1")
    trainer = train_diffusion(cfg)
    assert trainer.status == "done" and trainer.bad_total == 0
    with pytest.raises(GuidedError, match="learn_sigma=false"):
        DiffusionTrainer(tiny("diffusion", f"train.objective={objective}"))


def test_label_dropout_uses_the_null_class(tiny):
    trainer = DiffusionTrainer(tiny("diffusion", "train.label_dropout=1.0"))
    batch = trainer.prepare_batch(torch.zeros(8, 3, 8, 8), torch.arange(8))
    assert (batch["y"] == 10).all()


def test_nonfinite_steps_are_skipped_and_too_many_stop_the_run(tiny):
    trainer = DiffusionTrainer(tiny("diffusion", "train.max_bad_steps=2", "train.steps=3"))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    losses = trainer.losses
    trainer.losses = lambda b: (lambda loss, v: (loss * float("nan"), v))(*losses(b))
    with pytest.raises(GuidedError, match="step 2: 2 non-finite steps in a row.*none saved yet"):
        trainer.run()
    assert trainer.bad_total == 2 and all(torch.equal(before[k], v) for k, v in trainer.net.state_dict().items())


def test_sigterm_saves_a_checkpoint_and_stops(tiny):
    trainer = DiffusionTrainer(tiny("diffusion", "train.steps=10", "train.save_every=100"))
    prepare = trainer.prepare_batch

    def prepare_then_signal(x0, y):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return prepare(x0, y)
    trainer.prepare_batch = prepare_then_signal
    assert trainer.run() == "stopped" and trainer.step == 3
    assert [s for s, _ in ck.list_checkpoints(trainer.out_dir)] == [3]


# -- two processes (gloo on CPU) ----------------------------------------------------------------------
def _two_process_body(out_dir):
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object

    AcceleratorState._reset_state(reset_partial_state=True)  # forked: forget the parent's single process

    writes = []
    real = ck.atomic_write
    ck.atomic_write = lambda path, write: (writes.append(str(path)), real(path, write))[1]
    try:
        trainer = DiffusionTrainer(tiny_config("diffusion", out_dir, "train.steps=2", "train.save_every=1"))
        seen = []
        prepare = trainer.prepare_batch
        trainer.prepare_batch = lambda x0, y: (seen.append(x0.clone()), prepare(x0, y))[1]
        trainer.run()
    finally:
        ck.atomic_write = real
    flat = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
    report = gather_object([dict(rank=trainer.rank, world=trainer.world, seen=seen[0], weights=flat, writes=writes)])
    if trainer.rank == 0:
        torch.save(report, Path(out_dir) / "report.pt")


def test_two_processes_shard_data_agree_on_weights_and_one_writes(tmp_path):
    from accelerate import debug_launcher

    debug_launcher(_two_process_body, args=(str(tmp_path),), num_processes=2)
    r0, r1 = torch.load(tmp_path / "report.pt", weights_only=False)
    assert (r0["world"], r1["world"], r1["rank"]) == (2, 2, 1)
    assert not torch.equal(r0["seen"], r1["seen"])  # each process read its own shard
    assert torch.equal(r0["weights"], r1["weights"])
    assert r0["writes"] and not r1["writes"]
    assert {s for s, _ in ck.list_checkpoints(tmp_path)} == {1, 2}


# -- the command line ----------------------------------------------------------------------------------
def run_main(main, argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def tiny_argv(kind, out_dir, *extra):
    nets = TINY_UNET if kind == "diffusion" else TINY_CLASSIFIER
    return ["--config", str(REPO / "configs" / ("digits.yaml" if kind == "diffusion" else "digits_classifier.yaml")),
            *nets, *TINY_TRAIN, f"train.out_dir={out_dir}", *extra]


@pytest.mark.parametrize("extra, message", [
    (["data.kind=folder", "data.root=/no/such/folder"], "/no/such/folder"),
    (["data.classes=[3,x]"], "class 'x' is not in"),
    (["train.no_such_key=1"], "no_such_key"),
    (["train.batch_size=many"], "batch_size"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, extra, message):
    code, err = run_main(main_diffusion, tiny_argv("diffusion", tmp_path / "run", *extra), capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err and message in err


def test_a_folder_without_images_is_an_error(tmp_path, capsys):
    (tmp_path / "empty" / "n01440764").mkdir(parents=True)
    argv = tiny_argv("classifier", tmp_path / "run", "data.kind=imagenet", f"data.root={tmp_path / 'empty'}")
    code, err = run_main(main_classifier, argv, capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err


def test_resume_refuses_another_architecture_and_corrupt_checkpoints(tmp_path, capsys):
    argv = tiny_argv("diffusion", tmp_path / "run", "train.steps=2")
    assert run_main(main_diffusion, argv, capsys)[0] == 0
    code, err = run_main(main_diffusion, argv + ["model.model_channels=64", "--resume"], capsys)
    assert code == 2 and "does not fit this architecture" in err and "\n" not in err
    code, err = run_main(main_diffusion, argv, capsys)  # no --resume: never overwrite a run
    assert code == 2 and "--resume" in err
    for _, path in ck.list_checkpoints(tmp_path / "run"):
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        code, err = run_main(main_diffusion, argv + ["--resume"], capsys)
    assert code == 2 and err.startswith("error: no readable checkpoint") and "truncated or corrupt" in err


def test_dry_run_prints_the_resolved_config(capsys):
    assert main_classifier(["--config", str(REPO / "configs" / "digits_classifier.yaml"), "--dry-run",
                            "train.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 32" in out and "${" not in out


def test_script_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train_diffusion.py"), "--config",
                           str(REPO / "configs" / "digits.yaml"), "train.nope=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
