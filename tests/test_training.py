"""The trainers on the digits data: a few steps, two processes, exact resume, faults, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import guided.files
from guided.networks import checkpoints as ck
from guided.training import checkpoints as run_ck
from guided.cli.train import main_classifier, main_diffusion
from guided.errors import GuidedError
from guided.training.classifier import train_classifier
from guided.training.diffusion import DiffusionTrainer, train_diffusion

from conftest import TINY_CLASSIFIER, TINY_TRAIN, TINY_UNET, tiny_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"diffusion": train_diffusion, "classifier": train_classifier}


def same_weights(a, b) -> bool:
    sa, sb = a.trainer.net.state_dict(), b.trainer.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_diffusion_trainer_writes_a_run_folder(tiny):
    cfg = tiny("diffusion")
    trainer = train_diffusion(cfg)
    out = Path(cfg.train.out_dir)
    assert trainer.status == "done" and trainer.step == 4 and trainer.out_dir == out
    assert trainer.checkpoint == run_ck.checkpoint_path(out, 4) and trainer.stopped_by is None
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "label_map.json", "ckpt-0000002.pt", "ckpt-0000004.pt", "model.pt", "ema.pt"} <= names
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "mse", "vb", "loss_q0", "images_per_s", "bad_steps"} <= logs[-1].keys()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    model, run_cfg, labels = ck.load_trained(out, which="ema")
    assert run_cfg.model.num_classes == 10 and labels.keys[3] == "3" and not model.training


def test_classifier_trainer_reports_heldout_accuracy_per_quarter(tiny):
    trainer = train_classifier(tiny("classifier")).trainer
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
    a, b = whole.trainer.ema.averages, resumed.trainer.ema.averages
    assert all(torch.equal(x, y) for r in a for x, y in zip(a[r], b[r]))


@pytest.mark.parametrize("objective", ["vp_dsm", "ncsn"])
def test_score_matching_objectives_train(tiny, objective):
    cfg = tiny("diffusion", f"train.objective={objective}", "model.learn_sigma=false", "diffusion.variance=fixed_small",
               "train.ncsn_levels=10", "train.ncsn_sigma_max=1.0", "train.label_dropout=0.1")
    result = train_diffusion(cfg)
    assert result.status == "done" and result.trainer.bad_total == 0
    with pytest.raises(GuidedError, match="learn_sigma=false"):
        DiffusionTrainer(tiny("diffusion", f"train.objective={objective}"))


def test_label_dropout_uses_the_null_class(tiny):
    trainer = DiffusionTrainer(tiny("diffusion", "train.label_dropout=1.0"))
    batch = trainer.prepare_batch(torch.zeros(8, 3, 8, 8), torch.arange(8))
    assert (batch["y"] == 10).all()


@pytest.mark.parametrize("log_every", [2, 3])
def test_nonfinite_steps_are_skipped_and_too_many_stop_the_run(tiny, log_every):
    """The flags are read every log_every steps: the error names the step where the run of bad steps
    reached train.max_bad_steps, and comes at the read that finds it (step 3 when reading every 3)."""
    trainer = DiffusionTrainer(tiny("diffusion", "train.max_bad_steps=2", "train.steps=5",
                                    f"train.log_every={log_every}", "train.save_every=10"))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    losses = trainer.losses
    trainer.losses = lambda b: (lambda loss, v: (loss * float("nan"), v))(*losses(b))
    with pytest.raises(GuidedError, match="step 2: 2 non-finite steps in a row.*none saved yet"):
        trainer.run()
    assert trainer.step == log_every and trainer.bad_total == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.net.state_dict().items())


def with_fused_adamw(monkeypatch):
    """The trainers with a fused AdamW on the CPU: the optimizer they get on CUDA by default."""
    import guided.training.steps as training

    monkeypatch.setattr(training, "adamw", lambda params, *, lr, weight_decay, device, fused=True:
                        torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True))


def test_a_fused_adamw_skips_a_nonfinite_step_on_the_device(tiny, monkeypatch, capsys):
    """NaN loss at step 2, an infinite gradient at step 4, flags read once at step 5: neither bad step
    moves the weights, the EMA or the optimizer's moments and step count; both are counted and logged
    with their own step numbers."""
    from test_faults import InfGrad

    with_fused_adamw(monkeypatch)
    trainer = DiffusionTrainer(tiny("diffusion", "train.steps=5", "train.log_every=5", "train.save_every=10"))
    assert trainer.opt.optimizer.defaults["fused"]
    losses, seen = trainer.losses, {}

    def faulty(b):
        loss, values = losses(b)
        opt = [t.clone() for st in trainer.opt.optimizer.state.values() for t in st.values()]
        seen[trainer.step + 1] = [p.detach().clone() for p in trainer.params + trainer.ema.averages["0.9"]] + opt
        return {2: loss * float("nan"), 4: InfGrad.apply(loss)}.get(trainer.step + 1, loss), values
    trainer.losses = faulty
    trainer.run()
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(seen[2], seen[3]) and same(seen[4], seen[5]) and not same(seen[3], seen[4])
    assert trainer.bad_total == 2 and {int(st["step"]) for st in trainer.opt.optimizer.state.values()} == {3}
    out = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row, 1 in all)" in out
    assert "step 4: non-finite loss or gradient, step skipped (1 in a row, 2 in all)" in out


def test_a_training_step_reads_nothing_back_from_the_device(tiny, monkeypatch):
    """No value leaves the device in a step (with a fused AdamW): no item(), bool() or float() of a
    tensor (aten._local_scalar_dense, what a GPU would wait for) and no tolist() or numpy(); a bad step
    too. The reads happen every log_every steps instead (Trainer.read_bad_steps, QuarterMeter.flush)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads, watching = [], []

    class HostReads(TorchDispatchMode):
        def __enter__(self):
            watching.append(True)
            return super().__enter__()

        def __exit__(self, *exc):
            watching.pop()
            return super().__exit__(*exc)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, real=real, name=name, **k:
                            (watching and reads.append(name)) or real(self, *a, **k))
    with_fused_adamw(monkeypatch)
    trainer = DiffusionTrainer(tiny("diffusion"))
    losses = trainer.losses
    trainer.losses = lambda b: (lambda loss, v: (loss * float("nan") if trainer.step == 1 else loss, v))(*losses(b))
    took = []
    for _ in range(3):  # a good step, a bad one, a good one
        x0, y = next(trainer.batches)
        with HostReads():
            took.append(trainer.train_step(x0, y)[0])
            trainer.meter.add(None, {"x": torch.ones(2)}, took[-1])
        trainer.step += 1
    assert reads == []
    with HostReads():  # the check can see a read
        assert torch.stack(took).tolist() == [True, False, True] and bool(took[0])
    assert reads == ["tolist", torch.ops.aten._local_scalar_dense.default]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_on_cuda_a_training_step_never_waits_for_the_device(tiny):
    """CUDA's sync debug mode raises at any synchronisation inside the steps (after two warm-up steps:
    the first use of the schedule's tables copies them over once)."""
    trainer = DiffusionTrainer(tiny("diffusion"))
    batches = [next(trainer.batches) for _ in range(4)]
    for x0, y in batches[:2]:
        trainer.train_step(x0, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x0, y in batches[2:]:
            took, values, t = trainer.train_step(x0, y)
            trainer.meter.add(trainer.objective.log_t(t), values, took)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert bool(took)


def test_sigterm_saves_a_checkpoint_and_stops(tiny):
    trainer = DiffusionTrainer(tiny("diffusion", "train.steps=10", "train.save_every=100"))
    prepare = trainer.prepare_batch

    def prepare_then_signal(x0, y):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return prepare(x0, y)
    trainer.prepare_batch = prepare_then_signal
    assert trainer.run() == "stopped" and trainer.step == 3
    assert [s for s, _ in run_ck.list_checkpoints(trainer.out_dir)] == [3]


# -- two processes (gloo on CPU) ----------------------------------------------------------------------
def _two_process_body(out_dir):
    from accelerate.state import AcceleratorState
    from accelerate.utils import gather_object

    AcceleratorState._reset_state(reset_partial_state=True)  # forked: forget the parent's single process

    writes = []
    real = guided.files.atomic_write
    guided.files.atomic_write = lambda path, write: (writes.append(str(path)), real(path, write))[1]
    try:
        trainer = DiffusionTrainer(tiny_config("diffusion", out_dir, "train.steps=2", "train.save_every=1"))
        seen = []
        prepare = trainer.prepare_batch
        trainer.prepare_batch = lambda x0, y: (seen.append(x0.clone()), prepare(x0, y))[1]
        trainer.run()
    finally:
        guided.files.atomic_write = real
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
    assert {s for s, _ in run_ck.list_checkpoints(tmp_path)} == {1, 2}


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
    for _, path in run_ck.list_checkpoints(tmp_path / "run"):
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


# -- nothing silently wrong ------------------------------------------------------------------------------
def test_mixed_precision_no_is_accepted_as_yaml_reads_it(tmp_path, capsys):
    """YAML reads `no` (also off, false) as a boolean, which OmegaConf made the string 'False'."""
    (tmp_path / "no.yaml").write_text("train:\n  mixed_precision: no\n  steps: 1\n")
    for argv in (["train.mixed_precision=no"], ["--config", str(tmp_path / "no.yaml")]):
        assert main_diffusion(argv + ["--dry-run"]) == 0
        assert "mixed_precision: 'no'" in capsys.readouterr().out
    code, err = run_main(main_diffusion, tiny_argv("diffusion", tmp_path / "run", "train.steps=1",
                                                   "train.mixed_precision=no"), capsys)
    assert code == 0 and "error" not in err


def test_trainer_says_how_many_processes_on_what_and_where_it_writes(tiny, capsys):
    cfg = tiny("diffusion", "train.steps=2", "train.save_every=2")
    train_diffusion(cfg)
    out = capsys.readouterr().out
    assert f"unet training: 1 process, device cpu; run folder {cfg.train.out_dir} (train.out_dir)" in out
    assert (f"writing config.yaml, label_map.json, metrics.jsonl and every 2 steps (train.save_every) ckpt-*.pt, "
            f"model.pt and ema.pt into {cfg.train.out_dir}") in out


def test_trainer_help_names_the_run_folder_and_save_every(capsys):
    for main in (main_diffusion, main_classifier):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "train.out_dir" in text and "train.save_every" in text and "(default: digits" in text


def test_an_odd_image_size_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_main(main_diffusion, tiny_argv("diffusion", run, "model.image_size=17", "data.image_size=17"),
                         capsys)
    assert code == 2 and "image_size 17 is not a multiple of 2" in err and not run.exists()


def test_ctrl_c_saves_and_stops_like_sigterm(tiny):
    before = signal.getsignal(signal.SIGINT)  # Python's handler, or SIG_IGN in a background job
    trainer = DiffusionTrainer(tiny("diffusion", "train.steps=10", "train.save_every=100"))
    prepare = trainer.prepare_batch

    def prepare_then_interrupt(x0, y):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return prepare(x0, y)
    trainer.prepare_batch = prepare_then_interrupt
    assert trainer.run() == "stopped" and trainer.step == 3 and trainer.stopped_by == "SIGINT"
    assert [s for s, _ in run_ck.list_checkpoints(trainer.out_dir)] == [3]
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_a_training_folder_is_locked_and_a_dead_runs_lock_reclaimed(tiny):
    cfg = tiny("diffusion", "train.steps=2")
    out = Path(cfg.train.out_dir)
    out.mkdir(parents=True)
    (out / ".lock").write_text("1")  # pid 1 is alive: another run
    with pytest.raises(GuidedError, match=f"{out} is in use by another run \\(pid 1\\); wait for it or choose another "
                                          "train.out_dir"):
        DiffusionTrainer(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(str(dead.pid))  # a run that died
    trainer = DiffusionTrainer(cfg)
    assert (out / ".lock").read_text() == str(os.getpid())
    trainer.run()
    assert not (out / ".lock").exists()


def test_configs_by_name_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in ("digits.yaml", "digits_uncond", "configs/imagenet64.yaml"):
        assert main_diffusion(["--config", name, "--dry-run"]) == 0, name
        assert "image_size:" in capsys.readouterr().out
    code, err = run_main(main_diffusion, ["--config", "nope.yaml"], capsys)
    assert code == 2 and "nor is it a shipped config (" in err and "digits, digits_classifier" in err


def test_the_built_package_carries_its_configs(tmp_path):
    """configs/ is package data (guided/configs in the wheel), so an installed guided finds
    `--config digits.yaml` from any folder."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    for item in ("configs", "guided"):
        shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("guided-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {f"guided/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")} <= names
    packages = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "guided").rglob("__init__.py")}
    assert packages <= {n.rsplit("/", 1)[0].replace("/", ".") for n in names}  # no package left out of the list
    probe = ("import sys, guided; from guided.cli.train import main_diffusion; print(guided.__file__); "
             "sys.exit(main_diffusion(['--config', 'digits.yaml', '--dry-run']))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.startswith(str(tmp_path / "site")), proc.stderr
    assert "out_dir: runs/digits" in proc.stdout
