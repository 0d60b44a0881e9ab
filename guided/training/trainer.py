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
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from guided.data import build_dataset, infinite_batches
from guided.diffusion.objectives import objective_from_config
from guided.locks import first_rank, lock_folder
from guided.signals import StopRequest
from guided.data.latents import LatentDataset, build_cache
from guided.networks.diffusers import load_vae
from guided.training.meters import QuarterMeter
from guided.training.posthoc_ema import PowerEMA
from guided.training.progress import Progress
from guided.training.run_state import EMA, RunState
from guided.training.steps import (BadSteps, RunLog, check_fits, check_train_config, local_batch, microbatches,
                                   optimizer_step, prepare_network, set_lr, start_accelerate, stop_agreed)


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

    def __getattr__(self, name):  # code written when these functions returned the trainer
        if name == "trainer":
            raise AttributeError(name)
        return getattr(self.trainer, name)


class Trainer:
    kind = "unet"  # or "classifier": which network and config node
    net_cfg_key = "model"

    def __init__(self, cfg, resume: bool = False):
        self.cfg = copy.deepcopy(cfg)  # the resolved config: what the data decides is recorded here
        tc = self.cfg.train
        check_train_config(tc)
        self.accel = start_accelerate(tc)
        self.rank, self.world, self.device = self.accel.process_index, self.accel.num_processes, self.accel.device
        self.out_dir = Path(tc.out_dir)
        self.runlog = RunLog(self.accel, self.out_dir)
        self.print = self.runlog.print
        self.print(f"{self.kind} training: {self.world} process{'es' if self.world > 1 else ''}, device {self.device}; "
                   f"run folder {self.out_dir} (train.out_dir)")
        self.local_batch = local_batch(tc, self.world, self.device)
        self.dataset = self.encoded(build_dataset(self.cfg.data), "train")
        self.label_map = self.dataset.label_map
        self.fit_config_to_data()
        build(self, resume)

    @property
    def bad_total(self) -> int:
        return self.bad_steps.total

    def release(self):
        """Give up the run folder's lock (rank 0)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def prepare_batch(self, x0, y) -> dict:
        """This step's randomness for the whole per-process batch (not per microbatch): tensors
        with a leading batch dimension: x (the network input), t (if any), ..."""
        raise NotImplementedError

    def losses(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, {name: per-example values to log}) of one microbatch."""
        raise NotImplementedError

    def evaluate(self):
        """Held-out evaluation, every train.eval.every steps and at the end."""

    def probe(self):
        """A sample-quality probe of the EMA weights, every train.probe.every steps."""

    def finish(self):
        """At the end of a run that reached train.steps (the figures of its evaluations)."""

    def after_step(self, t, values, took):
        """See a finished step's timesteps and per-example values."""

    def state_parts(self) -> dict:
        """Stateful parts to save with the run, by name (run_state.RunState.register)."""
        return self.objective.parts()

    def encoded(self, dataset, split: str):
        """The dataset itself, or with data.vae its latents (guided.data.latents.encoded)."""
        return encoded(dataset, self.cfg.data, split, self.out_dir, self.device, self.accel.is_main_process,
                       self.accel.wait_for_everyone)

    def fit_config_to_data(self):
        """Check that the network fits the images (or their latents), and build the objective."""
        latents = getattr(self.dataset, "shape", None) if self.cfg.data.get("vae") else None
        check_fits(self.cfg, self.net_cfg_key, latents)
        self.objective = objective_from_config(self.cfg)

    def set_num_classes(self, node):
        """Record the data's class count in the resolved config (never in the caller's)."""
        n = self.dataset.num_classes
        if node.num_classes not in (None, n):
            self.print(f"note: {self.net_cfg_key}.num_classes {node.num_classes} -> {n} (the classes in the data)")
        node.num_classes = n

    def train_step(self, x0, y) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Forward/backward over microbatches, clip, check, step. Returns (took, logs, t), `took` a
        flag on the device: nothing here waits for the device (the flags are read every log_every
        steps, see read_bad_steps), so the host can queue the next step while this one runs."""
        batch = self.prepare_batch(x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        parts, n = microbatches(batch, self.cfg.train.microbatch), len(batch["x"])
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
        took = optimizer_step(self.accel, self.opt, bad)
        self.opt.zero_grad(set_to_none=True)
        values = {k: torch.cat([v[k] for v in logs]) for k in logs[0]}
        values["grad_norm"] = norm.detach().float().expand(n)
        self.ema.update(took, self.step)
        if self.phema is not None:
            self.phema.update(took, self.step)
        return took, values, batch.get("t")

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
        self.runlog.start(self.cfg, self.label_map)
        bar = tqdm(total=tc.steps, initial=self.step, disable=not self.accel.is_main_process, dynamic_ncols=True)
        window, start, done_here = [time.time(), 0], self.step, 0
        try:
            with self.stop:
                while self.step < tc.steps:
                    read = self.one_step(bar, window)
                    done_here += 1
                    if stop_agreed(self.stop, self.accel, read) or (stop_after and done_here >= stop_after):
                        self.stopped_by = self.stop.by
                        self.save()
                        self.print(f"stopped at step {self.step} ({self.stop.by or 'stop_after'}); "
                                   f"checkpoint {self.last_ckpt}; continue with --resume")
                        return "stopped"
                    if self.step % tc.save_every == 0 and self.step < tc.steps:
                        self.save()
                if not tc.eval.every or self.step % tc.eval.every:
                    self.evaluate()
                self.finish()
                if start < tc.steps or self.last_ckpt is None:
                    self.save()
                return "done"
        finally:
            bar.close()
            self.accel.end_training()

    def one_step(self, bar, window) -> bool:
        """One training step and the hooks due after it; returns whether the log was read."""
        tc = self.cfg.train
        with torch.random.fork_rng(devices=[]):  # DataLoader draws a seed from the global RNG
            x0, y = next(self.batches)
        set_lr(self.opt, tc, self.step)
        took, values, t = self.train_step(x0, y)
        self.step, window[1] = self.step + 1, window[1] + len(x0) * self.world
        bar.update(1)
        self.bad_steps.unread.append(took)
        self.meter.add(None if t is None else self.objective.log_t(t), values, took)
        self.after_step(t, values, took)
        read = self.step % tc.log_every == 0 or self.step == tc.steps
        if read:
            self.read_bad_steps()
            stats = self.runlog.log(self.meter, bar, window, step=self.step, bad_total=self.bad_total,
                                    lr=self.opt.param_groups[0]["lr"], last_ckpt=self.last_ckpt)
            if "loss" in stats:
                self.progress.see_loss(self.step, stats["loss"], self.print)
        if tc.eval.every and self.step % tc.eval.every == 0:
            self.evaluate()
        if tc.probe.every and self.step % tc.probe.every == 0:
            self.probe()
        if self.step in tc.snapshot_steps and (path := self.run_state.export_snapshot(self.step)):
            self.print(f"step {self.step}: EMA snapshot {path}")
        if self.phema is not None and self.accel.is_main_process and (
                self.step % tc.posthoc_ema.every == 0 or self.step == tc.steps):
            self.phema.snapshot(self.out_dir, self.step)
        return read

    def read_bad_steps(self):
        self.bad_steps.read(self.step, self.last_ckpt)

    def record(self, stats: dict):
        """Send to the trackers and append to out_dir/metrics.jsonl (main process)."""
        self.runlog.record(stats, self.step, self.last_ckpt)

    def save(self):
        self.read_bad_steps()  # bad_total goes into the checkpoint
        path = self.run_state.save(self.step, self.bad_total, self.stream)
        self.last_ckpt = path if path is not None else self.last_ckpt

    def result(self, status: str) -> TrainResult:
        return TrainResult(status, self.stopped_by, self.step, self.out_dir, self.last_ckpt, self.cfg, self)


def encoded(dataset, data_cfg, split: str, out_dir, device, main: bool, wait):
    """`dataset` itself, or with data_cfg.vae the dataset of its latents from the cache in
    data_cfg.latent_cache/<split> (default: <out_dir>/latents/<split>), built once by the `main` process
    while the others `wait`."""
    if not data_cfg.get("vae"):
        return dataset
    space = load_vae(data_cfg.vae, "data.vae")
    space.vae.to(device)
    folder = Path(data_cfg.latent_cache or Path(out_dir) / "latents") / split
    if main:
        build_cache(dataset, space, folder, data_cfg.image_size)
    wait()
    return LatentDataset(folder, dataset)



def build(self, resume: bool) -> None:
    """Assemble a trainer's network, optimizer, EMA, post-hoc EMAs, progress curves and run state; then resume
    (or check the run folder) and open the batch stream."""
    tc = self.cfg.train
    torch.manual_seed(tc.seed)  # the same initial weights in every process
    self.model, self.opt, self.net = prepare_network(self.accel, self.build_model(), tc)
    self.ema = EMA(self.net, tc.ema_rates, tc.ema_warmup)
    self.params = self.ema.params
    ph = tc.posthoc_ema  # EDM2's power-function EMAs, snapshotted for a post-hoc choice (posthoc_ema.py)
    self.phema = PowerEMA(self.net, ph.sigma_rels) if ph.sigma_rels else None
    self.run_state = RunState(self.accel, self.cfg, kind=self.kind, label_map=self.label_map, net=self.net,
                              opt=self.opt, ema=self.ema, note=self.print)
    self.progress = Progress()  # the curves the done and diverging signals read (progress.py)
    parts = {**self.state_parts(), "progress": self.progress, **({"posthoc_ema": self.phema} if self.phema else {})}
    for name, part in parts.items():
        self.run_state.register(name, part)
    self.rngs, self.step, self.last_ckpt, self.stopped_by = self.run_state.rngs, 0, None, None
    self.bad_steps = BadSteps(tc.max_bad_steps, self.print)
    self.meter = QuarterMeter(self.objective.num_levels, self.device)
    self.stop = StopRequest(lambda: self.print(f"Ctrl-C: saving a checkpoint after step {self.step + 1} "
                                               "(press it again to stop at once)"))
    # rank 0 holds the run folder's lock from here to the end of run(): no second run may
    # write (or --resume from and clean up) this folder meanwhile
    self.lock = first_rank(lambda: lock_folder(self.out_dir, "train.out_dir"), self.rank, self.world)
    try:
        resumed = self.run_state.resume(resume)
        if resumed is not None:
            self.step, self.bad_steps.total, self.last_ckpt = resumed.step, resumed.bad_total, resumed.path
        self.stream = infinite_batches(self.dataset, self.local_batch, self.rank, self.world, tc.seed,
                                       self.cfg.data.num_workers, None if resumed is None else resumed.data)
        self.batches = iter(self.stream)
    except BaseException:
        self.release()
        raise


def train(trainer_cls, cfg, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Build a trainer of `cfg` (resuming with `resume`), run it, and say how it ended."""
    trainer = trainer_cls(cfg, resume=resume)
    return trainer.result(trainer.run(stop_after=stop_after))
