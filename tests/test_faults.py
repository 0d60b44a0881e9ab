"""Faults: runs killed at any moment, diverging, or out of disk lose nothing.

Every case records what it injected and what survived into the report of
tests/fault_harness.py ($GUIDED_FAULT_REPORT), which scripts/fault_table.py renders.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN, TINY_UNET
from fault_harness import REPO, Child, one_error_line, record_fault, wait_for
from guided import files
from guided.networks import checkpoints as ck
from guided.training import checkpoints as run_ck
from guided.cli.sample import main as sample_main
from guided.cli.train import main_diffusion
from guided.training.diffusion import DiffusionTrainer

STEPS = 60
RUN_ARGS = TINY_UNET + TINY_TRAIN + [f"train.steps={STEPS}", "train.save_every=2", "train.log_every=4"]
CHILD_ENV = {"OMP_NUM_THREADS": "1"}


def same(a, b) -> bool:
    """Exact equality of nested dicts / lists of tensors and numbers."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def newest(run: Path) -> int | None:
    found = run_ck.list_checkpoints(run)
    return found[-1][0] if found else None


def temp_files(run: Path) -> list[Path]:
    return [p for p in run.iterdir() if p.name.endswith(".tmp")] if run.is_dir() else []


def check_every_checkpoint_loads(run: Path) -> int:
    found = run_ck.list_checkpoints(run)
    for step, path in found:
        assert run_ck.load_checkpoint(path)["step"] == step
    for name in ("model.pt", "ema.pt"):
        if (run / name).exists():
            ck.read_file(run / name)
    return len(found)


# -- 1. kill at any moment ------------------------------------------------------------------------
def test_killed_at_random_moments_resumes_to_the_uninterrupted_weights(tmp_path):
    ref = tmp_path / "ref"  # the uninterrupted run, same command line (so the same config)
    assert main_diffusion(RUN_ARGS + [f"train.out_dir={ref}"]) == 0
    ref_state = run_ck.load_checkpoint(run_ck.checkpoint_path(ref, STEPS))

    run, log = tmp_path / "run", tmp_path / "run.log"
    argv = RUN_ARGS + [f"train.out_dir={run}", "--resume"]
    rng = random.Random(int(os.environ.get("GUIDED_FAULT_SEED", "1234")))  # where the kills land
    plan = ["kill", "kill_in_write", "term", "kill", "term_in_write", "kill_in_write"]
    counts = dict.fromkeys(plan, 0)
    loads, stale_seen, resumes_checked, real_processes = 0, 0, 0, 0
    cycles = 22
    for cycle in range(cycles):
        before = newest(run)
        kind = plan[cycle % len(plan)]
        if before is not None and before >= STEPS - 12:
            kind = "kill_in_write"  # near the end: kill every checkpoint write, so the run cannot finish
        env = dict(CHILD_ENV)
        if kind.endswith("in_write"):
            env[files.PAUSE_ENV] = "0.3"
        left = set(temp_files(run))  # temp files an earlier kill left behind (the child removes them)
        real = cycle in (1, 8)  # two cycles run the real script in a fresh interpreter
        if real:
            proc = subprocess.Popen([sys.executable, str(REPO / "train_diffusion.py"), *argv],
                                    env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            alive, pid = (lambda: proc.poll() is None), proc.pid
        else:
            child = Child("guided.cli.train:main_diffusion", argv, log, env)
            alive, pid = child.alive, child.pid
        sig = signal.SIGTERM if kind.startswith("term") else signal.SIGKILL
        if kind == "kill":
            time.sleep(rng.uniform(0.0, 1.0) + (5.0 if real else 0.0))
        elif kind.endswith("in_write"):
            wait_for(lambda: [p for p in temp_files(run) if p.name.startswith(".ckpt-") and p not in left], timeout=60,
                     child=None if real else child)
            time.sleep(rng.uniform(0.0, 0.25))
        else:  # SIGTERM once training is under way: a new checkpoint exists
            wait_for(lambda: (newest(run) or -1) > (before or -1), timeout=60, child=None if real else child)
            time.sleep(rng.uniform(0.0, 0.3))
        if alive():
            os.kill(pid, sig)
        if real:
            out, _ = proc.communicate(timeout=60)
            code, real_processes = proc.returncode, real_processes + 1
        else:
            code, out = child.wait(), child.output()
        assert "Traceback" not in out, out
        after = newest(run)
        if sig == signal.SIGTERM:
            assert code in (143, 0), (code, out)
            if code == 143:  # it saved a checkpoint at the step it stopped at
                stopped = int(out.split("stopped at step ")[1].split()[0])
                assert after == stopped and stopped > (before or 0)
        else:
            assert code in (-signal.SIGKILL, 0), (code, out)
        assert code != 0 or after == STEPS
        if before is not None and "resumed from" in out:  # every resume starts from the last complete one
            assert f"resumed from {run_ck.checkpoint_path(run, before)} at step {before}" in out, out
            resumes_checked += 1
        stale_seen += len(temp_files(run))
        loads += check_every_checkpoint_loads(run)
        counts[kind] += 1
        if code == 0:
            break
    kills = sum(counts.values())
    assert kills >= 20 and newest(run) is not None and newest(run) < STEPS

    final = Child("guided.cli.train:main_diffusion", argv, log, CHILD_ENV)
    assert final.wait() == 0, final.output()
    assert not temp_files(run)  # the resume removed what the killed writes left
    loads += check_every_checkpoint_loads(run)
    state = run_ck.load_checkpoint(run_ck.checkpoint_path(run, STEPS))
    for key in ("model", "ema", "optimizer", "step"):
        assert same(state[key], ref_state[key]), key
    assert same(ck.read_file(run / "ema.pt")["state_dict"], ck.read_file(ref / "ema.pt")["state_dict"])

    record_fault("kill_training", "training process killed at random moments, then `--resume`",
                 f"SIGKILL at a random time ({counts['kill']}x), SIGKILL while a checkpoint is being written "
                 f"({counts['kill_in_write']}x), SIGTERM mid-run ({counts['term']}x), SIGTERM during a checkpoint "
                 f"write ({counts['term_in_write']}x); {real_processes} of them on the real script",
                 kills,
                 f"every resume ({resumes_checked} checked) started from the newest complete checkpoint; all "
                 f"{loads} checkpoint files seen loaded (none truncated); {stale_seen} leftover temp files were never "
                 f"taken for checkpoints and were removed on resume; every SIGTERM exited 143 with a checkpoint of "
                 f"the step it stopped at; final model, EMA and optimizer state bit-identical to an uninterrupted "
                 f"run of the same seed")


# -- 2. divergence ----------------------------------------------------------------------------------
class InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_nonfinite_steps_are_skipped_counted_logged_and_a_run_of_them_stops(tiny, capsys):
    cfg = tiny("diffusion", "train.steps=12", "train.save_every=2", "train.max_bad_steps=3", "train.log_every=1")
    trainer = DiffusionTrainer(cfg)
    losses, snapshots = trainer.losses, {}

    def faulty(b):
        loss, values = losses(b)
        step = trainer.step + 1  # the step being computed
        snapshots.setdefault(step, [p.detach().clone() for p in trainer.params])
        if step == 3:
            return loss * float("nan"), values
        if step == 5:
            return InfGrad.apply(loss), values
        if step >= 7:
            return loss * float("inf"), values
        return loss, values
    trainer.losses = faulty
    with pytest.raises(Exception) as info:
        trainer.run()
    msg = str(info.value)
    assert "stopping at step 9: 3 non-finite steps in a row (train.max_bad_steps)" in msg, msg
    last = run_ck.checkpoint_path(cfg.train.out_dir, 8)  # saved after two skipped steps: the weights of step 6
    assert msg.endswith(f"last good checkpoint: {last}"), msg
    saved = run_ck.load_checkpoint(last)
    names = [n for n, _ in trainer.net.named_parameters()]
    assert saved["bad_total"] == 4 and all(torch.equal(saved["model"][n], p) for n, p in zip(names, snapshots[7]))
    assert trainer.bad_total == 5
    out = capsys.readouterr().out
    for step, row, total in ((3, 1, 1), (5, 1, 2), (7, 1, 3), (8, 2, 4), (9, 3, 5)):
        assert f"step {step}: non-finite loss or gradient, step skipped ({row} in a row, {total} in all)" in out
    # a skipped step leaves the weights as they were
    after_3 = snapshots[4]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], after_3))
    assert all(torch.equal(a, b) for a, b in zip(snapshots[5], snapshots[6]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5]))  # good steps do move them
    metrics = [__import__("json").loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").open()]
    assert [m["bad_steps"] for m in metrics if m["step"] in (2, 3, 5, 6)] == [0, 1, 2, 2]

    # the same through the command line: one line, exit 2, naming the step and the checkpoint
    out_dir = Path(cfg.train.out_dir).parent / "cli"
    argv = TINY_UNET + TINY_TRAIN + ["train.steps=6", "train.max_bad_steps=2", f"train.out_dir={out_dir}"]
    orig = DiffusionTrainer.losses
    try:
        DiffusionTrainer.losses = lambda self, b: (lambda l, v: (l * float("nan") if self.step >= 2 else l, v))(
            *orig(self, b))
        capsys.readouterr()
        code = main_diffusion(argv)
    finally:
        DiffusionTrainer.losses = orig
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line == (f"error: stopping at step 4: 2 non-finite steps in a row (train.max_bad_steps); "
                                  f"last good checkpoint: {out_dir / 'ckpt-0000002.pt'}"), line
    record_fault("divergence", "non-finite loss or gradient",
                 "NaN loss (1x), finite loss with an infinite gradient (1x), then inf loss every step "
                 "(3x in a row, train.max_bad_steps=3); and NaN from step 3 on through train_diffusion.py",
                 8, "each bad step skipped with the weights untouched, counted (bad_steps in metrics.jsonl and the "
                    "checkpoint) and logged; a run of them stops: `" + line.replace(str(out_dir.parent), "…") + "`")


# -- 3. disk full / unwritable --------------------------------------------------------------------
def _digests(run: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()
            and p.suffix == ".pt"}


@pytest.mark.parametrize("failure", ["ENOSPC", "EACCES", "EROFS"])
def test_a_checkpoint_write_that_fails_keeps_the_previous_files(tmp_path, monkeypatch, capsys, failure):
    run = tmp_path / "run"
    argv = TINY_UNET + TINY_TRAIN + ["train.steps=4", f"train.out_dir={run}"]
    assert main_diffusion(argv) == 0
    kept = _digests(run)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):  # write half of the file, then the disk is full
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_replace = os.replace

    def failing_replace(src, dst):  # EACCES: the checkpoint rename only; EROFS: every write
        if failure == "EROFS" or Path(dst).name.startswith("ckpt-"):
            code = errno.EROFS if failure == "EROFS" else errno.EACCES
            raise OSError(code, os.strerror(code), str(dst))
        return real_replace(src, dst)
    capsys.readouterr()
    with monkeypatch.context() as m:
        if failure == "ENOSPC":
            m.setattr(torch, "save", failing_save)
        else:
            m.setattr(os, "replace", failing_replace)
        code = main_diffusion(argv[:-2] + ["train.steps=8", f"train.out_dir={run}", "--resume"])
    line = one_error_line(capsys.readouterr().err)
    start = f"error: cannot write {'' if failure == 'EROFS' else 'a checkpoint '}into {run}: "
    assert code == 2 and line.startswith(start), line
    assert _digests(run) == kept and not temp_files(run)  # the old checkpoints and exports untouched
    assert check_every_checkpoint_loads(run) == 2
    assert real_replace is os.replace
    assert main_diffusion(argv[:-1] + ["train.steps=8", f"train.out_dir={run}", "--resume"]) == 0  # room again
    assert newest(run) == 8
    how = {"ENOSPC": "torch.save writes half the checkpoint then raises ENOSPC",
           "EACCES": "the rename onto ckpt-*.pt raises EACCES (permission denied)",
           "EROFS": "every rename in the run folder raises EROFS (read-only output folder)"}[failure]
    fault = "checkpoint write fails" if failure != "EROFS" else "output folder unwritable"
    record_fault(f"disk_{failure}", fault, how, 1,
                 "previous ckpt-*.pt, model.pt, ema.pt byte-identical, no temp file left; one line `"
                 + line.replace(str(tmp_path), "…") + "`, exit 2; a later --resume finishes")


SAMPLE_ARGS = ["--num-samples", "8", "--sampler", "ddim", "--steps", "4", "--scale", "2", "--class", "3,5"]


def _samples(path: Path):
    with np.load(path) as f:
        return f["arr_0"].copy(), f["arr_1"].copy()


@pytest.fixture(scope="module")
def reference_samples(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert sample_main(SAMPLE_ARGS + ["--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    return _samples(out / "samples.npz")


def test_a_sample_write_that_fails_keeps_finished_batches(tmp_path, monkeypatch, capsys, reference_samples):
    out = tmp_path / "out"
    real_savez, calls = np.savez, []

    def failing_savez(f, *arrays):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_savez(f, *arrays)
    argv = SAMPLE_ARGS + ["--batch-size", "2", "--out", str(out), "--device", "cpu"]
    with monkeypatch.context() as m:
        m.setattr(np, "savez", failing_savez)
        code = sample_main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line == (f"error: cannot write {out / 'parts' / 'batch-00000002.npz'}: No space left on "
                                  f"device; the previous files are untouched"), line
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert parts == ["batch-00000000.npz", "plan.json"] and not (out / ".lock").exists()
    import guided.generation.writer as gen
    drawn, real_batch = [], gen.sample_batch
    with monkeypatch.context() as m:
        m.setattr(gen, "sample_batch", lambda p, labels, seeds, *a, **k: (drawn.append(list(seeds)),
                                                                         real_batch(p, labels, seeds, *a, **k))[1])
        assert sample_main(argv) == 0
    assert drawn == [[2, 3], [4, 5], [6, 7]]  # the finished batch 0-1 was kept, not drawn again
    images, labels = _samples(out / "samples.npz")
    assert np.array_equal(images, reference_samples[0]) and np.array_equal(labels, reference_samples[1])
    # parts of an interrupted run with another --batch-size are not mistaken for this one's
    other = tmp_path / "other"
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(np, "savez", failing_savez)
        assert sample_main(SAMPLE_ARGS + ["--batch-size", "2", "--out", str(other), "--device", "cpu"]) == 2
    assert sample_main(SAMPLE_ARGS + ["--batch-size", "4", "--out", str(other), "--device", "cpu"]) == 0
    assert _samples(other / "samples.npz")[0].shape[0] == 8
    record_fault("disk_samples", "sample write fails (ENOSPC)", "np.savez of the 2nd batch writes a few bytes "
                 "then raises ENOSPC", 1, "finished batch kept in OUT/parts, lock released, one line `"
                 + line.replace(str(tmp_path), "…") + "`, exit 2; the rerun keeps the batch and gives the same "
                 "images as an uninterrupted run")


# -- 4. sampling: interrupted and concurrent runs ---------------------------------------------------
def test_a_killed_sampling_run_resumes_and_reclaims_its_lock(tmp_path, reference_samples):
    out = tmp_path / "out"
    argv = SAMPLE_ARGS + ["--batch-size", "2", "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, str(REPO / "sample_guided.py"), *argv],
                            env={**os.environ, **CHILD_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: len(list((out / "parts").glob("batch-*.npz"))) >= 2 if (out / "parts").is_dir() else False,
             timeout=120, poll=0.01)
    proc.kill()
    proc.communicate()
    done = sorted(p.name for p in (out / "parts").glob("batch-*.npz"))
    assert proc.returncode == -signal.SIGKILL and 2 <= len(done) < 4
    assert (out / ".lock").read_text().strip() == str(proc.pid)  # a stale lock of a dead process
    kept = {n: (out / "parts" / n).stat().st_mtime_ns for n in done}
    child = Child("guided.cli.sample:main", argv, tmp_path / "resume.log", CHILD_ENV)
    assert child.wait(120) == 0, child.output()
    assert f"| {2 * len(kept)}/8 [" in child.output()  # the rerun's progress starts at the kept batches
    images, labels = _samples(out / "samples.npz")
    assert np.array_equal(images, reference_samples[0]) and np.array_equal(labels, reference_samples[1])
    assert not (out / ".lock").exists()
    record_fault("kill_sampling", "sample_guided.py killed part-way (SIGKILL), then rerun", "SIGKILL after 2 of 4 "
                 "batches", 1, f"{len(kept)} finished batches kept, the dead run's lock reclaimed, the rerun drew only "
                 "the missing ones; samples.npz identical to an uninterrupted run")


def test_two_runs_cannot_share_an_output_folder(tmp_path, capsys, reference_samples):
    out = tmp_path / "out"
    argv = SAMPLE_ARGS + ["--batch-size", "2", "--out", str(out), "--device", "cpu"]
    release = tmp_path / "release"  # the first run holds the lock until the second has been refused
    first = Child("fault_harness:sample_held", argv, tmp_path / "first.log",
                  {**CHILD_ENV, "GUIDED_TEST_RELEASE": str(release)})
    wait_for(lambda: (out / ".lock").exists(), timeout=60, poll=0.001)
    code = sample_main(argv)
    release.touch()
    line = one_error_line(capsys.readouterr().err)
    assert first.wait(120) == 0, first.output()
    assert code == 2 and line == (f"error: {out} is in use by another run (pid {first.pid}); wait for it or "
                                  f"choose another --out"), line
    images, labels = _samples(out / "samples.npz")
    assert np.array_equal(images, reference_samples[0]) and np.array_equal(labels, reference_samples[1])
    record_fault("two_samplers", "a second sample_guided.py on the same --out", "started while the first held "
                 "OUT/.lock", 1, "refused with `" + line.replace(str(tmp_path), "…").replace(str(first.pid), "PID")
                 + "`, exit 2; the first run's samples.npz is exactly an undisturbed run's")


# -- 5. a real full disk, and torch.save's own way of failing ------------------------------------------
def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys):
    """A tmpfs with room for the first checkpoint and its exports, not for the second: torch.save
    hits ENOSPC (and reports it as RuntimeError 'unexpected pos'); the run stops in one line."""
    argv = TINY_UNET + TINY_TRAIN + ["train.steps=4", "train.save_every=2"]
    ref = tmp_path / "ref"
    assert main_diffusion(argv + [f"train.out_dir={ref}"]) == 0
    ckpt, weights = (ref / "ckpt-0000002.pt").stat().st_size, (ref / "model.pt").stat().st_size
    disk = tmp_path / "disk"
    size = ckpt + 3 * weights + 256 * 1024  # a checkpoint, model.pt, ema.pt and one export's temp file
    if not _mount_tmpfs(disk, size):
        pytest.skip("mounting a tmpfs is refused here; the injected ENOSPC and RuntimeError cases still run")
    try:
        run = disk / "run"
        capsys.readouterr()
        code = main_diffusion(argv + [f"train.out_dir={run}"])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and line == f"error: cannot write a checkpoint into {run}: [Errno 28] No space left on device"
        assert newest(run) == 2 and check_every_checkpoint_loads(run) == 1 and not temp_files(run)
        assert not (run / ".lock").exists()
        assert subprocess.run(["mount", "-o", "remount,size=64m", str(disk)]).returncode == 0  # room again
        assert main_diffusion(argv + [f"train.out_dir={run}", "--resume"]) == 0
        state, ref_state = (run_ck.load_checkpoint(run_ck.checkpoint_path(d, 4)) for d in (run, ref))
        assert all(same(state[k], ref_state[k]) for k in ("model", "ema", "optimizer"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    record_fault("disk_full_real", "disk really full during a training checkpoint",
                 f"a {size / 2**20:.1f} MB tmpfs: room for the first checkpoint ({ckpt / 2**20:.1f} MB) and its "
                 f"exports, not for the second", 1,
                 "ckpt-0000002.pt, model.pt, ema.pt intact and loadable, no temp file, lock released; one line `"
                 + line.replace(str(tmp_path), "…") + "`, exit 2; after the tmpfs is grown, --resume reaches the "
                 "weights of an uninterrupted run bit for bit")


def test_torch_saves_runtime_error_is_a_failed_write(tmp_path, monkeypatch, capsys):
    """torch.save's zip writer turns a failed write into RuntimeError ('unexpected pos'): the same
    one line and intact files as an OSError, whatever the disk of the machine running the tests."""
    run = tmp_path / "run"
    argv = TINY_UNET + TINY_TRAIN + ["train.steps=2", f"train.out_dir={run}"]
    assert main_diffusion(argv) == 0
    kept = _digests(run)
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:4096])
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", failing_save)
        code = main_diffusion(argv[:-2] + ["train.steps=4", f"train.out_dir={run}", "--resume"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line == (f"error: cannot write a checkpoint into {run}: [Errno 5] torch.save failed: "
                                  f"[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096"), line
    assert _digests(run) == kept and not temp_files(run) and not (run / ".lock").exists()
    record_fault("disk_torch_runtime", "checkpoint write fails inside torch.save",
                 "torch.save writes 4 KB then raises its RuntimeError 'unexpected pos' (what it raises after ENOSPC)",
                 1, "previous ckpt-*.pt, model.pt, ema.pt byte-identical, no temp file, lock released; one line `"
                 + line.replace(str(tmp_path), "…") + "`, exit 2")


# -- 6. one run per training folder -----------------------------------------------------------------
def test_two_trainers_cannot_share_a_run_folder_and_a_dead_ones_lock_is_reclaimed(tmp_path, capsys):
    run = tmp_path / "run"
    argv = TINY_UNET + TINY_TRAIN + ["train.steps=40", "train.save_every=4", f"train.out_dir={run}"]
    slow = {**CHILD_ENV, files.PAUSE_ENV: "0.3"}  # the first run stays busy while the others try
    first = Child("guided.cli.train:main_diffusion", argv, tmp_path / "first.log", slow)
    wait_for(lambda: (run / ".lock").exists(), timeout=60, child=first)
    refused = []
    for extra in ([], ["--resume"]):  # a second run, and a --resume that would clean up the first's temp files
        capsys.readouterr()
        code = main_diffusion(argv + ["train.steps=8"] + extra)
        refused.append((code, one_error_line(capsys.readouterr().err)))
    assert first.wait(120) == 0, first.output()
    expected = f"error: {run} is in use by another run (pid {first.pid}); wait for it or choose another train.out_dir"
    assert refused == [(2, expected)] * 2, refused
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(2, 41, 2))  # the first run's rows only, once each
    assert "steps: 40" in (run / "config.yaml").read_text() and newest(run) == 40
    assert not (run / ".lock").exists()

    # a trainer killed mid-run leaves its lock; the next --resume reclaims it
    more = argv[:-1] + ["train.steps=48", f"train.out_dir={run}", "--resume"]
    killed = Child("guided.cli.train:main_diffusion", more, tmp_path / "killed.log", CHILD_ENV)
    wait_for(lambda: newest(run) > 40, timeout=60, child=killed)
    killed.kill(signal.SIGKILL)
    killed.wait()
    assert (run / ".lock").read_text() == str(killed.pid)
    capsys.readouterr()
    assert main_diffusion(more) == 0
    assert newest(run) == 48 and not (run / ".lock").exists()
    record_fault("two_trainers", "a second trainer on the same train.out_dir",
                 "started (and once with --resume) while the first held train.out_dir/.lock; then a trainer "
                 "SIGKILLed mid-run", 3,
                 "both refused with `" + expected.replace(str(tmp_path), "…").replace(str(first.pid), "PID")
                 + "`, exit 2; config.yaml, metrics.jsonl and checkpoints are the first run's alone; the killed "
                 "trainer's stale lock was reclaimed by the next --resume, which finished")


def test_ctrl_c_during_training_saves_a_checkpoint_and_stops(tmp_path):
    run = tmp_path / "run"
    argv = RUN_ARGS + ["train.save_every=10", f"train.out_dir={run}"]
    child = Child("guided.cli.train:main_diffusion", argv, tmp_path / "run.log", CHILD_ENV)
    wait_for(lambda: newest(run), timeout=60, child=child)  # under way: the step-10 checkpoint exists
    time.sleep(0.3)
    child.kill(signal.SIGINT)
    code, out = child.wait(), child.output()
    assert "Traceback" not in out and code == 130, (code, out)
    stopped = int(out.split("stopped at step ")[1].split()[0])
    assert f"stopped at step {stopped} (SIGINT)" in out and newest(run) == stopped
    assert not (run / ".lock").exists()
    resumed = Child("guided.cli.train:main_diffusion", argv + ["--resume"], tmp_path / "resume.log", CHILD_ENV)
    assert resumed.wait(120) == 0 and f"resumed from {run_ck.checkpoint_path(run, stopped)} at step {stopped}" in \
        resumed.output()
    record_fault("sigint_training", "Ctrl-C (SIGINT) during training", "SIGINT once training was under way", 1,
                 "the step finished and a checkpoint of it was saved, exit 130, lock released; --resume "
                 "continued from it")


def test_sigterm_stops_sampling_with_a_message_and_frees_its_lock(tmp_path):
    out = tmp_path / "out"
    argv = ["--num-samples", "40", "--batch-size", "2", "--sampler", "ddim", "--steps", "4", "--class", "3,5",
            "--out", str(out), "--device", "cpu"]
    # the real script in its own interpreter: a forked child that dies inside tqdm's cross-process
    # lock (shared with this process after fork) would leave it taken for every later bar here
    proc = subprocess.Popen([sys.executable, str(REPO / "sample_guided.py"), *argv], env={**os.environ, **CHILD_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(list((out / "parts").glob("batch-*.npz"))) if (out / "parts").is_dir() else 0,
             timeout=120, poll=0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    line = one_error_line(err)
    kept = len(list((out / "parts").glob("batch-*.npz")))
    assert proc.returncode == 143 and line == ("error: stopped by SIGTERM; what was finished is kept (rerun the "
                                               "same command to continue)"), (proc.returncode, err)
    assert not (out / ".lock").exists() and 1 <= kept < 20
    rerun = Child("guided.cli.sample:main", argv, tmp_path / "rerun.log", CHILD_ENV)
    assert rerun.wait(120) == 0 and f"| {2 * kept}/40 [" in rerun.output()
    assert _samples(out / "samples.npz")[0].shape[0] == 40
    record_fault("sigterm_sampling", "SIGTERM to sample_guided.py", "SIGTERM once a batch had finished", 1,
                 f"one line `{line}`, exit 143, lock removed, the finished batches kept ({kept}); the rerun drew "
                 "only the rest")


# -- 7. non-finite samples --------------------------------------------------------------------------
def test_non_finite_samples_are_an_error_that_keeps_the_finished_batches(tmp_path, monkeypatch, capsys,
                                                                         reference_samples):
    import guided.generation.writer as gen

    out = tmp_path / "out"
    argv = SAMPLE_ARGS + ["--batch-size", "2", "--out", str(out), "--device", "cpu"]
    real_batch = gen.sample_batch

    def diverging(p, labels, seeds, *a, **k):  # the second batch blows up
        x = real_batch(p, labels, seeds, *a, **k)
        return x * float("nan") if seeds[0] == 2 else x
    with monkeypatch.context() as m:
        m.setattr(gen, "sample_batch", diverging)
        code = sample_main(argv)
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and line == ("error: batch 2 (samples 2..3) came out NaN or infinite: the sampler diverged "
                                  f"(is --scale 2 too large?); the finished batches are kept in {out / 'parts'} (1)")
    assert sorted(p.name for p in (out / "parts").glob("*.npz")) == ["batch-00000000.npz"]
    assert not (out / ".lock").exists() and not (out / "samples.npz").exists()
    assert sample_main(argv) == 0
    images, labels = _samples(out / "samples.npz")
    assert np.array_equal(images, reference_samples[0]) and np.array_equal(labels, reference_samples[1])
    record_fault("nonfinite_samples", "a batch of samples comes out NaN", "the 2nd of 4 batches multiplied by NaN "
                 "(a real `--scale 1e30 --sampler ddpm` does it to every batch: see the bad-input table)", 1,
                 "no samples.npz written; one line `" + line.replace(str(tmp_path), "…") + "`, exit 2; the rerun "
                 "kept the finished batch and gave the images of an undisturbed run")


# -- 8. processes that each think they are alone ------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs, --multi_gpu really starts a process group")
def test_multi_gpu_launch_without_gpus_is_refused_by_every_process(tmp_path):
    """accelerate launch --multi_gpu on a machine without GPUs starts two copies that are each
    rank 0 of 1: both stop with one line instead of training twice into one folder."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(REPO / "train_diffusion.py"), *TINY_UNET, *TINY_TRAIN, f"train.out_dir={run}"],
                          env={**os.environ, **CHILD_ENV}, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    expected = ("error: this process was started as one of 2 (WORLD_SIZE=2) but runs alone on cpu, as would every "
                "copy, all writing the same files; on CPUs launch with ACCELERATE_USE_CPU=1 accelerate launch "
                "--multi_gpu --num_processes 2 ...")
    assert proc.returncode != 0 and errors == [expected] * 2, proc.stderr
    assert proc.stdout.count("unet training: 1 process, device cpu") == 2 and not run_ck.list_checkpoints(run)
    record_fault("two_rank0", "two processes that each believe they are rank 0 of 1",
                 "`accelerate launch --multi_gpu --num_processes 2 train_diffusion.py` on a machine without GPUs", 1,
                 "each printed its world size and device and stopped with `" + expected + "`; nothing was trained")
