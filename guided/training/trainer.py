"""The training loop shared by the score-model and classifier trainers, on Accelerate.

`Trainer` is the loop: one optimisation step over microbatches with gradient clipping and
the non-finite check, AdamW with optional linear annealing, per-quarter loss logging
accumulated on the device, and the evaluation, probe, snapshot and checkpoint hooks at
their intervals. The run state (random generators, EMA, checkpoints, resume) is in
run_state.py, the objective (noise levels, randomness, loss) in guided.diffusion.objectives,
SIGTERM / Ctrl-C in guided/signals.py. A subclass builds its network and computes
per-example losses (diffusion.py, classifier.py).

A step never waits for the device (with a fused AdamW: the CUDA default): a non-finite
step is skipped there, and the host reads the flags, counts the skipped steps and
stops a run of them at the log reads, every train.log_every steps.

train.batch_size is the global batch (the paper's tables): each of N processes
reads batch_size / N images of its own shard per step.
"""
from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guided.data import build_dataset, infinite_batches
from guided.diffusion.objectives import objective_from_config
from guided.errors import GuidedError
from guided.locks import check_world_size, first_rank, lock_folder
from guided.signals import StopRequest
from guided.speed import adamw, speed_up
from guided.training import checkpoints as ck
from guided.training.meters import QuarterMeter, flat_hparams
from guided.training.run_state import EMA, RunState


def check_train_config(tc) -> None:
    """Refuse train.* values out of range in one line, before anything is built."""
    o, ev, pr = tc.objective, tc.eval, tc.probe
    rules = [("steps", tc.steps >= 0, "0 (just save the initial weights) or more"),
             ("batch_size", tc.batch_size >= 1, "at least 1"),
             ("microbatch", tc.microbatch >= 0, "0 (whole batch) or more"), ("lr", tc.lr >= 0, "0 or more"),
             ("weight_decay", tc.weight_decay >= 0, "0 or more"), ("log_every", tc.log_every >= 1, "at least 1"),
             ("save_every", tc.save_every >= 1, "at least 1"), ("eval.every", ev.every >= 0, "0 or more"),
             ("eval.images", ev.images >= 1, "at least 1"), ("probe.every", pr.every >= 0, "0 (off) or more"),
             ("probe.samples", pr.samples >= 2, "at least 2"),
             ("keep_checkpoints", tc.keep_checkpoints >= 1, "at least 1"),
             ("max_bad_steps", tc.max_bad_steps >= 1, "at least 1"), ("grad_clip", tc.grad_clip >= 0, "0 or more"),
             ("objective.label_dropout", 0 <= o.label_dropout <= 1, "in [0, 1]"),
             ("num_threads", tc.num_threads >= 0, "0 (default) or more"),
             ("ema_rates", all(0 <= r <= 1 for r in tc.ema_rates), "a list of rates in [0, 1]"),
             ("seed", 0 <= tc.seed < 2**63, "in 0 .. 2**63 - 1"),
             ("export_dtype", tc.export_dtype in ("fp32", "fp16"), "fp32 or fp16")]
    for key, ok, want in rules:
        if not ok:
            value = list(tc.ema_rates) if key == "ema_rates" else OmegaConf.select(tc, key)
            raise GuidedError(f"train.{key} must be {want}, not {value!r}")
    if not all(math.isfinite(v) for v in (tc.lr, tc.weight_decay, tc.grad_clip)):
        raise GuidedError("train.lr, train.weight_decay and train.grad_clip must be finite numbers")


def start_accelerate(tc):
    """The Accelerator of train.mixed_precision and train.tracker, or a one-line GuidedError."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if tc.mixed_precision not in ("no", "bf16", "fp16"):
        raise GuidedError(f"train.mixed_precision must be no, bf16 or fp16, not {tc.mixed_precision!r}")
    AcceleratorState._reset_state()  # allow a new mixed-precision setting in the same process
    tracker = None if str(tc.tracker).lower() in ("none", "", "null") else tc.tracker
    try:
        return Accelerator(mixed_precision=tc.mixed_precision, log_with=tracker, project_dir=tc.out_dir)
    except (ValueError, RuntimeError, ImportError) as e:
        raise GuidedError(f"cannot start Accelerate with mixed_precision={tc.mixed_precision}, "
                          f"tracker={tc.tracker}: {str(e).splitlines()[0]}") from None


@dataclass
class TrainResult:
    """How a training call ended: "done" or "stopped" (by SIGTERM, SIGINT or stop_after), at `step`,
    with its newest checkpoint; `cfg` is the resolved config the run saved."""

    status: str
    stopped_by: str | None
    step: int
    out_dir: Path
    checkpoint: Path | None
    cfg: object = field(repr=False)
    trainer: "Trainer" = field(repr=False)  # for tests and notebooks that look inside


class Trainer:
    kind = "unet"  # or "classifier": which network and config node
    net_cfg_key = "model"

    def __init__(self, cfg, resume: bool = False):
        self.cfg = copy.deepcopy(cfg)  # the resolved config: what the data decides is recorded here
        tc = self.cfg.train
        check_train_config(tc)
        self.accel = start_accelerate(tc)
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
        self.dataset = build_dataset(self.cfg.data)
        self.label_map = self.dataset.label_map
        self.fit_config_to_data()
        self.build(resume)

    def build(self, resume: bool):
        """The network, optimizer, EMA and run state; then resume (or check the run folder)."""
        tc = self.cfg.train
        torch.manual_seed(tc.seed)  # the same initial weights in every process
        net = self.build_model()
        opt = adamw(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, device=self.accel.device,
                    fused=tc.fused_optimizer)
        self.model, self.opt = self.accel.prepare(speed_up(net, channels_last=tc.channels_last), opt)
        self.net = self.accel.unwrap_model(self.model)
        if tc.compile:
            self.model = torch.compile(self.model)
        self.ema = EMA(self.net, tc.ema_rates, tc.ema_warmup)
        self.params = self.ema.params
        self.run_state = RunState(self.accel, self.cfg, kind=self.kind, label_map=self.label_map, net=self.net,
                                  opt=self.opt, ema=self.ema, note=self.print)
        for name, part in self.state_parts().items():
            self.run_state.register(name, part)
        self.step, self.bad_total, self.bad_in_row, self.last_ckpt = 0, 0, 0, None
        self.unread_flags: list[torch.Tensor] = []  # per step since the last read: took the step?
        self.meter = QuarterMeter(self.objective.num_levels, self.device)
        self.stop = StopRequest(lambda: self.print(f"Ctrl-C: saving a checkpoint after step {self.step + 1} "
                                                   "(press it again to stop at once)"))
        self.stopped_by = None
        # rank 0 holds the run folder's lock from here to the end of run(): no second run may
        # write (or --resume from and clean up) this folder meanwhile
        self.lock = first_rank(lambda: lock_folder(self.out_dir, "train.out_dir"), self.rank, self.world)
        try:
            resumed = self.run_state.resume(resume)
            if resumed is not None:
                self.step, self.bad_total, self.last_ckpt = resumed.step, resumed.bad_total, resumed.path
            self.stream = infinite_batches(self.dataset, self.local_batch, self.rank, self.world, tc.seed,
                                           self.cfg.data.num_workers, None if resumed is None else resumed.data)
            self.batches = iter(self.stream)
        except BaseException:
            self.release()
            raise

    @property
    def gen(self) -> torch.Generator:
        """The CPU generator of the loop's draws (timesteps, label dropout)."""
        return self.run_state.rngs.gen

    @property
    def noise_gen(self) -> torch.Generator:
        """The device generator of the loop's noise."""
        return self.run_state.rngs.noise_gen

    def release(self):
        """Give up the run folder's lock (rank 0)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- hooks --------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def prepare_batch(self, x0, y) -> dict:
        """Draw this step's randomness for the whole per-process batch (so it does not depend on
        the microbatch size): a dict of tensors with a leading batch dimension: x (the network input), t (if any), ..."""
        raise NotImplementedError

    def losses(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, {name: per-example values to log}) of one microbatch."""
        raise NotImplementedError

    def evaluate(self):
        """Held-out evaluation, every train.eval.every steps and at the end."""

    def probe(self):
        """A sample-quality probe of the EMA weights, every train.probe.every steps."""

    def after_step(self, t, values, took):
        """See a finished step's timesteps and per-example values."""

    def state_parts(self) -> dict:
        """Stateful parts to save with the run, by name (run_state.RunState.register)."""
        return self.objective.parts()

    def fit_config_to_data(self):
        """Check that the network fits the images, and build the objective."""
        net, data = self.cfg[self.net_cfg_key], self.cfg.data
        if data.image_size != net.image_size:
            raise GuidedError(f"data.image_size={data.image_size} but {self.net_cfg_key}.image_size="
                              f"{net.image_size}; set them equal")
        if data.channels != net.in_channels:
            raise GuidedError(f"data.channels={data.channels} but {self.net_cfg_key}.in_channels={net.in_channels}")
        self.objective = objective_from_config(self.cfg)

    def set_num_classes(self, node):
        """Record the data's class count in the resolved config (never in the caller's)."""
        n = self.dataset.num_classes
        if node.num_classes not in (None, n):
            self.print(f"note: {self.net_cfg_key}.num_classes {node.num_classes} -> {n} (the classes in the data)")
        node.num_classes = n

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
        self.ema.update(took, self.step)
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
        self.start_run()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.accel.is_main_process, dynamic_ncols=True)
        window, start, done_here = [time.time(), 0], self.step, 0
        try:
            with self.stop:
                while self.step < tc.steps:
                    read = self.one_step(bar, window)
                    done_here += 1
                    if self.stop_requested(read) or (stop_after and done_here >= stop_after):
                        self.stopped_by = self.stop.by
                        self.save()
                        self.print(f"stopped at step {self.step} ({self.stop.by or 'stop_after'}); "
                                   f"checkpoint {self.last_ckpt}; continue with --resume")
                        return "stopped"
                    if self.step % tc.save_every == 0 and self.step < tc.steps:
                        self.save()
                if not tc.eval.every or self.step % tc.eval.every:
                    self.evaluate()
                if start < tc.steps or self.last_ckpt is None:
                    self.save()
                return "done"
        finally:
            bar.close()
            self.accel.end_training()

    def start_run(self):
        """config.yaml and label_map.json into the run folder; the trackers."""
        if self.accel.is_main_process:
            ck.write_run_files(self.out_dir, self.cfg, self.label_map)
            self.print(f"writing config.yaml, label_map.json, metrics.jsonl and every {self.cfg.train.save_every} "
                       f"steps (train.save_every) ckpt-*.pt, model.pt and ema.pt into {self.out_dir}")
        if self.accel.log_with:
            self.accel.init_trackers("tb", config=flat_hparams(self.cfg))

    def one_step(self, bar, window) -> bool:
        """One training step and the hooks due after it; returns whether the log was read."""
        tc = self.cfg.train
        with torch.random.fork_rng(devices=[]):  # DataLoader draws a seed from the global RNG
            x0, y = next(self.batches)
        self.set_lr()
        took, values, t = self.train_step(x0, y)
        self.step, window[1] = self.step + 1, window[1] + len(x0) * self.world
        bar.update(1)
        self.unread_flags.append(took)
        self.meter.add(None if t is None else self.objective.log_t(t), values, took)
        self.after_step(t, values, took)
        read = self.step % tc.log_every == 0 or self.step == tc.steps
        if read:
            self.log(bar, window)
        if tc.eval.every and self.step % tc.eval.every == 0:
            self.evaluate()
        if tc.probe.every and self.step % tc.probe.every == 0:
            self.probe()
        if self.step in tc.snapshot_steps:
            self.export_snapshot()
        return read

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
            return self.stop.by is not None
        if not read:
            return False
        flag = self.accel.reduce(torch.tensor(float(self.stop.by is not None), device=self.device), reduction="sum")
        if flag.item() > 0 and self.stop.by is None:
            self.stop.by = "a stop request in another process"
        return self.stop.by is not None

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

    # -- checkpoints --------------------------------------------------------------------------
    def save(self):
        self.read_bad_steps()  # bad_total goes into the checkpoint
        path = self.run_state.save(self.step, self.bad_total, self.stream)
        self.last_ckpt = path if path is not None else self.last_ckpt

    def export_snapshot(self):
        path = self.run_state.export_snapshot(self.step)
        if path is not None:
            self.print(f"step {self.step}: EMA snapshot {path}")

    def result(self, status: str) -> TrainResult:
        return TrainResult(status, self.stopped_by, self.step, self.out_dir, self.last_ckpt, self.cfg, self)


def train(trainer_cls, cfg, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Build a trainer of `cfg` (resuming with `resume`), run it, and say how it ended."""
    trainer = trainer_cls(cfg, resume=resume)
    return trainer.result(trainer.run(stop_after=stop_after))
