"""The training machinery shared by the score-model and classifier trainers, on Accelerate.

`Trainer` owns what both loops need: the Accelerator (processes, mixed precision,
trackers), seeding, AdamW with optional linear annealing, EMA weights at several
rates, one optimisation step over microbatches with gradient clipping and the
non-finite check, per-quarter loss logging accumulated on the device, atomic
checkpoints, resuming, the run folder's lock, and SIGTERM / SIGINT. A subclass
builds its network and computes per-example losses (train_diffusion_loop.py,
train_classifier_loop.py).

A step never waits for the device (with a fused AdamW: the CUDA default): a non-finite
step is skipped there, and the host reads the flags, counts the skipped steps and
stops a run of them at the log reads, every train.log_every steps.

Determinism: every random draw of the loop comes from generators saved in the
checkpoint -- `self.gen` (CPU: timesteps, label dropout), `self.noise_gen` (on the
device: the diffusion noise), torch's global RNG (dropout layers) -- and the batch
stream restarts at its saved position, so on CPU a resumed run reaches the same
weights, bit for bit, as an uninterrupted one with the same seed.

train.batch_size is the global batch (the paper's tables): each of N processes
reads batch_size / N images of its own shard per step.
"""
from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from guided.networks import checkpoints as ck
from guided.networks.adm import load_state_dict_strict
from guided.config import to_yaml
from guided.data import build_dataset, infinite_batches
from guided.diffusion.gaussian import create_diffusion
from guided.errors import GuidedError
from guided.locks import check_world_size, first_rank, lock_folder
from guided.speed import adamw, speed_up
from guided.training.meters import QuarterMeter, derive_seed, flat_hparams


def check_train_config(tc) -> None:
    """Refuse train.* values out of range in one line, before anything is built."""
    rules = [("steps", tc.steps >= 0, "0 (just save the initial weights) or more"),
             ("batch_size", tc.batch_size >= 1, "at least 1"),
             ("microbatch", tc.microbatch >= 0, "0 (whole batch) or more"), ("lr", tc.lr >= 0, "0 or more"),
             ("weight_decay", tc.weight_decay >= 0, "0 or more"), ("log_every", tc.log_every >= 1, "at least 1"),
             ("save_every", tc.save_every >= 1, "at least 1"), ("eval_every", tc.eval_every >= 0, "0 or more"),
             ("eval_images", tc.eval_images >= 1, "at least 1"),
             ("probe_every", tc.probe_every >= 0, "0 (off) or more"),
             ("probe_samples", tc.probe_samples >= 2, "at least 2"),
             ("keep_checkpoints", tc.keep_checkpoints >= 1, "at least 1"),
             ("max_bad_steps", tc.max_bad_steps >= 1, "at least 1"), ("grad_clip", tc.grad_clip >= 0, "0 or more"),
             ("label_dropout", 0 <= tc.label_dropout <= 1, "in [0, 1]"),
             ("num_threads", tc.num_threads >= 0, "0 (default) or more"),
             ("ema_rates", all(0 <= r <= 1 for r in tc.ema_rates), "a list of rates in [0, 1]"),
             ("seed", 0 <= tc.seed < 2**63, "in 0 .. 2**63 - 1"),
             ("export_dtype", tc.export_dtype in ("fp32", "fp16"), "fp32 or fp16")]
    for key, ok, want in rules:
        if not ok:
            value = list(tc[key]) if key == "ema_rates" else tc[key]
            raise GuidedError(f"train.{key} must be {want}, not {value!r}")
    if not all(math.isfinite(v) for v in (tc.lr, tc.weight_decay, tc.grad_clip)):
        raise GuidedError("train.lr, train.weight_decay and train.grad_clip must be finite numbers")


class Trainer:
    kind = "unet"  # or "classifier": which network and config node
    net_cfg_key = "model"

    def __init__(self, cfg, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        self.cfg, tc = cfg, cfg.train
        check_train_config(tc)
        if tc.mixed_precision not in ("no", "bf16", "fp16"):
            raise GuidedError(f"train.mixed_precision must be no, bf16 or fp16, not {tc.mixed_precision!r}")
        AcceleratorState._reset_state()  # allow a new mixed-precision setting in the same process
        tracker = None if str(tc.tracker).lower() in ("none", "", "null") else tc.tracker
        try:
            self.accel = Accelerator(mixed_precision=tc.mixed_precision, log_with=tracker, project_dir=tc.out_dir)
        except (ValueError, RuntimeError, ImportError) as e:
            raise GuidedError(f"cannot start Accelerate with mixed_precision={tc.mixed_precision}, "
                              f"tracker={tc.tracker}: {str(e).splitlines()[0]}") from None
        if tc.mixed_precision == "fp16" and self.accel.device.type == "cpu":
            self.print("note: fp16 mixed precision does nothing on the CPU; bf16 does")
        if tc.num_threads > 0:  # after Accelerate, which sets its own count for CPU processes
            torch.set_num_threads(tc.num_threads)
        self.rank, self.world, self.device = self.accel.process_index, self.accel.num_processes, self.accel.device
        self.out_dir = Path(tc.out_dir)
        self.print(f"{self.kind} training: {self.world} process{'es' if self.world > 1 else ''}, device {self.device}; "
                   f"run folder {self.out_dir} (train.out_dir)")
        check_world_size(self.world, self.device)
        if tc.batch_size % self.world:
            raise GuidedError(f"train.batch_size={tc.batch_size} does not split evenly over {self.world} processes")
        self.local_batch = tc.batch_size // self.world
        self.dataset = build_dataset(cfg.data)
        self.label_map = self.dataset.label_map
        self.fit_config_to_data()
        self.diffusion = create_diffusion(cfg.diffusion, timestep_respacing="")  # train on every timestep
        torch.manual_seed(tc.seed)  # the same initial weights in every process
        net = self.build_model()
        self.ema_rates = [float(r) for r in tc.ema_rates]
        opt = adamw(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, device=self.accel.device,
                    fused=tc.fused_optimizer)
        self.model, self.opt = self.accel.prepare(speed_up(net, channels_last=tc.channels_last), opt)
        self.net = self.accel.unwrap_model(self.model)
        if tc.compile:
            self.model = torch.compile(self.model)
        self.params = [p for p in self.net.parameters()]
        self.ema = {str(r): [p.detach().float().clone() for p in self.params] for r in self.ema_rates}
        self.seed_rngs(tc.seed)
        self.step, self.bad_total, self.bad_in_row, self.last_ckpt = 0, 0, 0, None
        self.unread_flags: list[torch.Tensor] = []  # per step since the last read: took the step?
        self.meter = QuarterMeter(self.num_noise_levels(), self.device)
        self._stop = self.stopped_by = None
        # rank 0 holds the run folder's lock from here to the end of run(): no second run may
        # write (or --resume from and clean up) this folder meanwhile
        self.lock = first_rank(lambda: lock_folder(self.out_dir, "train.out_dir"), self.rank, self.world)
        try:
            data_state = self.resume_or_check(resume)
            self.stream = infinite_batches(self.dataset, self.local_batch, self.rank, self.world, tc.seed,
                                           cfg.data.num_workers, data_state)
            self.batches = iter(self.stream)
        except BaseException:
            self.release()
            raise

    def release(self):
        """Give up the run folder's lock (rank 0)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- hooks --------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def num_noise_levels(self) -> int:
        """The range of the timesteps that losses are logged by quarter of."""
        return self.diffusion.num_original_steps

    def prepare_batch(self, x0, y) -> dict:
        """Draw this step's randomness for the whole per-process batch (so it does not depend on
        the microbatch size): a dict of tensors with a leading batch dimension: x (the network input), t (if any), ..."""
        raise NotImplementedError

    def losses(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, {name: per-example values to log}) of one microbatch."""
        raise NotImplementedError

    def evaluate(self):
        pass

    def probe(self):
        """A sample-quality probe of the EMA weights (score models; see guided/probe.py)."""

    def export_snapshot(self):
        """out_dir/ema_step{N}.pt: the first EMA's weights now (an early snapshot is a weak guide)."""
        if self.accel.is_main_process and self.ema:
            rate, sd = next(iter(self.ema_state_dicts().items()))
            path = self.out_dir / f"ema_step{self.step}.pt"
            try:
                ck.export_weights(path, sd, which=f"ema:{rate}", kind=self.kind, cfg=self.cfg,
                                  label_map=self.label_map, step=self.step, dtype=self.cfg.train.export_dtype)
            except OSError as e:
                raise GuidedError(f"cannot write {path}: {e.strerror or e}") from None
            self.print(f"step {self.step}: EMA snapshot {path}")

    def fit_config_to_data(self):
        """Check that the network fits the images, and set its class count to the data's."""
        net, data = self.cfg[self.net_cfg_key], self.cfg.data
        if data.image_size != net.image_size:
            raise GuidedError(f"data.image_size={data.image_size} but {self.net_cfg_key}.image_size="
                              f"{net.image_size}; set them equal")
        if data.channels != net.in_channels:
            raise GuidedError(f"data.channels={data.channels} but {self.net_cfg_key}.in_channels={net.in_channels}")

    def set_num_classes(self, node):
        n = self.dataset.num_classes
        if node.num_classes not in (None, n):
            self.print(f"note: {self.net_cfg_key}.num_classes {node.num_classes} -> {n} (the classes in the data)")
        node.num_classes = n

    # -- randomness ---------------------------------------------------------------------------
    def seed_rngs(self, seed: int, step: int = 0):
        torch.manual_seed(derive_seed(seed, self.rank, step, 0))  # dropout
        random.seed(derive_seed(seed, self.rank, step, 1))
        np.random.seed(derive_seed(seed, self.rank, step, 2) % 2**32)
        self.gen = torch.Generator().manual_seed(derive_seed(seed, self.rank, step, 3))
        self.noise_gen = torch.Generator(self.device).manual_seed(derive_seed(seed, self.rank, step, 4))

    def rng_state(self) -> dict:
        np_state = np.random.get_state()
        state = dict(torch=torch.get_rng_state(), python=random.getstate(), gen=self.gen.get_state(),
                     noise_gen=self.noise_gen.get_state(),
                     numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def set_rng_state(self, s: dict):
        torch.set_rng_state(s["torch"])
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
        name, keys, *rest = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        self.gen.set_state(s["gen"])
        self.noise_gen.set_state(s["noise_gen"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["cuda"])

    # -- one optimisation step ----------------------------------------------------------------
    def set_lr(self):
        tc = self.cfg.train
        lr = tc.lr * (1 - self.step / tc.steps) if tc.anneal_lr else tc.lr  # linear to 0, as the reference
        for group in self.opt.param_groups:
            group["lr"] = lr

    def microbatches(self, batch: dict):
        n, size = len(batch["x"]), self.cfg.train.microbatch
        size = n if size <= 0 else size
        return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]

    def train_step(self, x0, y) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Forward/backward over microbatches, clip, check, step. Returns (took, logs, t), `took` a
        flag on the device: nothing here waits for the device (the flags are read every log_every
        steps, see read_bad_steps), so the host can queue the next step while this one runs."""
        batch = self.prepare_batch(x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        parts, n = self.microbatches(batch), len(batch["x"])
        self.opt.zero_grad(set_to_none=True)
        total, logs = 0.0, []
        for i, part in enumerate(parts):
            sync = nullcontext() if i == len(parts) - 1 else self.accel.no_sync(self.model)
            with sync:
                loss, values = self.losses(part)
                self.accel.backward(loss * (len(part["x"]) / n))
            total, logs = total + loss.detach() * (len(part["x"]) / n), logs + [values]
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        norm = self.accel.clip_grad_norm_(self.model.parameters(), clip)
        bad = ~torch.isfinite(total) | ~torch.isfinite(norm.to(total.device))
        if self.world > 1:  # the same decision in every process
            bad = self.accel.reduce(bad.float(), reduction="sum") > 0
        took = self.optimizer_step(bad)
        self.opt.zero_grad(set_to_none=True)
        values = {k: torch.cat([v[k] for v in logs]) for k in logs[0]}
        values["grad_norm"] = norm.detach().float().expand(n)
        self.update_ema(took)
        return took, values, batch.get("t")

    def optimizer_step(self, bad: torch.Tensor) -> torch.Tensor:
        """The optimizer step unless `bad` (a non-finite loss or gradient); returns `took` on the device.
        A fused AdamW skips it on the device through its found_inf input (the GradScaler's way: neither
        weights, moments nor step count move); fp16's scaler skips a non-finite step itself and backs
        off its scale; any other optimizer needs `bad` on the host: free on the CPU, a wait on a GPU."""
        inner = self.opt.optimizer  # under Accelerate's wrapper
        if self.accel.scaler is not None:
            self.opt.step()
            return ~bad & (not self.accel.optimizer_step_was_skipped)
        if inner.defaults.get("fused"):
            inner.found_inf = bad.float()
            try:
                self.opt.step()
            finally:
                del inner.found_inf
        elif not bad.item():
            self.opt.step()
        return ~bad

    @torch.no_grad()
    def update_ema(self, took: torch.Tensor):
        """ema <- rate * ema + (1 - rate) * params, for every rate (the reference's update_ema), after a
        step that was taken (`took`, a 0-dim flag on the device: 0 leaves the EMA as it was); with
        train.ema_warmup the rate is at most (1 + k) / (10 + k) at step k, so a short run's EMA does
        not keep a share rate^k of the random initial weights."""
        src, took = [p.detach().float() for p in self.params], took.to(torch.float32)
        cap = (1 + self.step) / (10 + self.step) if self.cfg.train.ema_warmup else 1.0
        for rate, ema in zip(self.ema_rates, self.ema.values()):  # a list of weights: one tensor weight
            torch._foreach_lerp_(ema, src, [(1.0 - min(rate, cap)) * took] * len(ema))  # is read back as a number

    # -- the loop -----------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> str:
        """Train to train.steps. Returns "done", or "stopped" after SIGTERM or Ctrl-C (or
        `stop_after` steps of this call), in both cases with a checkpoint saved. The run
        folder's lock is released however it ends."""
        try:
            return self._run(stop_after)
        finally:
            self.release()

    def _run(self, stop_after: int | None) -> str:
        tc = self.cfg.train
        if self.accel.is_main_process:
            ck.write_run_files(self.out_dir, self.cfg, self.label_map)
            self.print(f"writing config.yaml, label_map.json, metrics.jsonl and every {tc.save_every} steps "
                       f"(train.save_every) ckpt-*.pt, model.pt and ema.pt into {self.out_dir}")
        if self.accel.log_with:
            self.accel.init_trackers("tb", config=flat_hparams(self.cfg))
        old = self.install_stop_signals()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.accel.is_main_process, dynamic_ncols=True)
        window, start, done_here = [time.time(), 0], self.step, 0
        try:
            while self.step < tc.steps:
                with torch.random.fork_rng(devices=[]):  # DataLoader draws a seed from the global RNG
                    x0, y = next(self.batches)
                self.set_lr()
                took, values, t = self.train_step(x0, y)
                self.step, done_here, window[1] = self.step + 1, done_here + 1, window[1] + len(x0) * self.world
                bar.update(1)
                self.unread_flags.append(took)
                self.meter.add(None if t is None else self.diffusion.original_t(t), values, took)
                self.after_step(t, values, took)
                read = self.step % tc.log_every == 0 or self.step == tc.steps
                if read:
                    self.log(bar, window)
                if tc.eval_every and self.step % tc.eval_every == 0:
                    self.evaluate()
                if tc.probe_every and self.step % tc.probe_every == 0:
                    self.probe()
                if self.step in tc.snapshot_steps:
                    self.export_snapshot()
                if self.stop_requested(read) or (stop_after and done_here >= stop_after):
                    self.stopped_by = self._stop
                    self.save()
                    self.print(f"stopped at step {self.step} ({self._stop or 'stop_after'}); "
                               f"checkpoint {self.last_ckpt}; continue with --resume")
                    return "stopped"
                if self.step % tc.save_every == 0 and self.step < tc.steps:
                    self.save()
            if not tc.eval_every or self.step % tc.eval_every:
                self.evaluate()
            if start < tc.steps or self.last_ckpt is None:
                self.save()
            return "done"
        finally:
            bar.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.accel.end_training()

    def after_step(self, t, values, took):
        pass

    def read_bad_steps(self):
        """Read the took-flags of the steps since the last read (one host read per log interval) and
        count the skipped ones, step by step, as they happened."""
        if not self.unread_flags:
            return
        flags, first = torch.stack(self.unread_flags).tolist(), self.step - len(self.unread_flags) + 1
        self.unread_flags = []
        for i, took in enumerate(flags):
            self.count_bad(first + i, took)

    def count_bad(self, step: int, took: bool):
        if took:
            self.bad_in_row = 0
            return
        self.bad_total, self.bad_in_row = self.bad_total + 1, self.bad_in_row + 1
        self.print(f"step {step}: non-finite loss or gradient, step skipped "
                   f"({self.bad_in_row} in a row, {self.bad_total} in all)")
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            raise GuidedError(f"stopping at step {step}: {self.bad_in_row} non-finite steps in a row "
                              f"(train.max_bad_steps); last good checkpoint: {self.last_ckpt or 'none saved yet'}")

    def stop_requested(self, read: bool) -> bool:
        """A stop request (SIGTERM): in one process as soon as it comes; with several, all must stop at
        the same step, so they agree on it at the reads of the log interval."""
        if self.world == 1:
            return self._stop is not None
        if not read:
            return False
        flag = self.accel.reduce(torch.tensor(float(self._stop is not None), device=self.device), reduction="sum")
        if flag.item() > 0 and self._stop is None:
            self._stop = "a stop request in another process"
        return self._stop is not None

    def log(self, bar, window):
        self.read_bad_steps()
        stats = self.meter.flush(self.accel)
        now = time.time()
        stats["images_per_s"] = window[1] / max(now - window[0], 1e-9)
        stats["bad_steps"] = self.bad_total
        stats["lr"] = self.opt.param_groups[0]["lr"]
        window[:] = [now, 0]
        self.record(stats)
        if "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.4g}", img_s=f"{stats['images_per_s']:.1f}", refresh=False)
        quarters = " ".join(f"{stats[f'loss_q{i}']:.4g}" for i in range(4) if f"loss_q{i}" in stats)
        self.print(f"step {self.step}: loss {stats.get('loss', float('nan')):.4g} (quarters {quarters}) "
                   f"{stats['images_per_s']:.1f} img/s")

    def record(self, stats: dict):
        """Send to the trackers and append to out_dir/metrics.jsonl (main process)."""
        if self.accel.log_with:
            self.accel.log(stats, step=self.step)
        if self.accel.is_main_process:
            try:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": self.step, **stats}) + "\n")
            except OSError as e:  # disk full: stop with one line (the last checkpoint is intact)
                raise GuidedError(f"cannot write {self.out_dir / 'metrics.jsonl'}: {e.strerror or e}; "
                                  f"last checkpoint: {self.last_ckpt or 'none saved yet'}") from None

    def print(self, *args):
        if self.accel.is_main_process:
            tqdm.write(" ".join(str(a) for a in args))

    # -- SIGTERM and Ctrl-C ---------------------------------------------------------------------
    def install_stop_signals(self) -> dict:
        """SIGTERM and SIGINT (Ctrl-C) finish the step, save a checkpoint and stop; a second
        Ctrl-C stops at once. Returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if name == "SIGINT" and self._stop == "SIGINT":
                raise KeyboardInterrupt
            if name == "SIGINT" and self._stop is None:
                self.print(f"Ctrl-C: saving a checkpoint after step {self.step + 1} (press it again to stop at once)")
            self._stop = self._stop or name
        return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    # -- checkpoints --------------------------------------------------------------------------
    def ema_state_dicts(self) -> dict:
        base = self.net.state_dict()
        names = [n for n, _ in self.net.named_parameters()]
        return {rate: {**base, **dict(zip(names, ema))} for rate, ema in self.ema.items()}

    def state(self) -> dict:
        from accelerate.utils import gather_object

        per_rank = gather_object([dict(rng=self.rng_state(), data=self.stream.state())])  # collective
        sampler = getattr(self.sampler, "state_dict", lambda: None)()
        return dict(kind=self.kind, config=to_yaml(self.cfg), label_map=self.label_map.to_dict(),
                    model=self.net.state_dict(), ema=self.ema_state_dicts(), optimizer=self.opt.state_dict(),
                    scaler=self.accel.scaler.state_dict() if self.accel.scaler is not None else None,
                    sampler={k: torch.as_tensor(v) for k, v in sampler.items()} if sampler else None,
                    world_size=self.world,
                    rng=[r["rng"] for r in per_rank], data=[r["data"] for r in per_rank],
                    bad_total=self.bad_total, calibration=self.calibration_dict())

    def calibration_dict(self):
        cal = getattr(self, "calibration", None)
        return cal.to_dict() if cal is not None else None

    def save(self):
        self.read_bad_steps()  # bad_total goes into the checkpoint
        state = self.state()
        if self.accel.is_main_process:
            try:
                self.write_checkpoint(state)
            except OSError as e:
                raise GuidedError(f"cannot write a checkpoint into {self.out_dir}: {e}") from None
        self.accel.wait_for_everyone()

    def write_checkpoint(self, state: dict):
        tc = self.cfg.train
        self.last_ckpt = ck.save_checkpoint(self.out_dir, self.step, state, tc.keep_checkpoints)
        common = dict(kind=self.kind, cfg=self.cfg, label_map=self.label_map, step=self.step, dtype=tc.export_dtype,
                      calibration=state.get("calibration"))
        ck.export_weights(self.out_dir / "model.pt", state["model"], which="model", **common)
        if state["ema"]:
            rate, sd = next(iter(state["ema"].items()))
            ck.export_weights(self.out_dir / "ema.pt", sd, which=f"ema:{rate}", **common)

    def resume_or_check(self, resume: bool) -> dict | None:
        """Load the newest good checkpoint (with --resume); refuse to overwrite a run without it."""
        found = ck.list_checkpoints(self.out_dir)
        if not resume:
            if found:
                raise GuidedError(f"{self.out_dir} already holds checkpoints (newest {found[-1][1].name}); "
                                  f"pass --resume to continue, or choose another train.out_dir")
            return None
        if self.accel.is_main_process:  # temp files of a write that a killed run never finished
            for stale in ck.remove_stale_temp_files(self.out_dir):
                self.print(f"note: removed {stale.name}, left by an interrupted write")
        latest = ck.latest_checkpoint(self.out_dir)
        if latest is None:
            self.print(f"--resume: no checkpoint in {self.out_dir} yet, starting from scratch")
            return None
        path, state = latest
        return self.load_state(path, state)

    def load_state(self, path, state: dict) -> dict | None:
        if state.get("kind") != self.kind:
            raise GuidedError(f"checkpoint {path} is a {state.get('kind')} checkpoint, not a {self.kind} one")
        load_state_dict_strict(self.net, state["model"], what=f"checkpoint {path}")
        names = [n for n, _ in self.net.named_parameters()]
        for rate in self.ema:
            if rate in state["ema"]:
                self.ema[rate] = [state["ema"][rate][n].float().to(self.device).clone() for n in names]
            else:
                self.print(f"note: checkpoint has no EMA at rate {rate}; starting it from the current weights")
                self.ema[rate] = [p.detach().float().clone() for p in self.params]
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise GuidedError(f"checkpoint {path}: optimizer state does not fit: {str(e).splitlines()[0]}") from None
        if state.get("scaler") and self.accel.scaler is not None:
            self.accel.scaler.load_state_dict(state["scaler"])
        if state.get("sampler") and hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict({k: v.numpy() for k, v in state["sampler"].items()})
        self.step, self.bad_total, self.last_ckpt = int(state["step"]), int(state.get("bad_total", 0)), path
        self.print(f"resumed from {path} at step {self.step}")
        if state.get("world_size") == self.world:
            self.set_rng_state(state["rng"][self.rank])
            return state["data"][self.rank]
        self.print(f"note: the checkpoint was written by {state.get('world_size')} processes, this run has "
                   f"{self.world}: random streams are reseeded and data restarts at the next epoch")
        self.seed_rngs(self.cfg.train.seed, self.step)
        return {"epoch": int(state["data"][0]["epoch"]) + 1, "step": 0}
