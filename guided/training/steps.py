"""The pieces of one optimisation step and the run's setup checks, used by the Trainer loop."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from guided.errors import GuidedError
from guided.locks import check_world_size
from guided.speed import adamw, speed_up
from guided.training import checkpoints as ck
from guided.training.meters import flat_hparams


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
             ("export_dtype", tc.export_dtype in ("fp32", "fp16"), "fp32 or fp16"),
             ("posthoc_ema.every", tc.posthoc_ema.every >= 1, "at least 1"),
             ("eval.bands", ev.bands >= 0, "0 (quarters only) or more"),
             ("eval.done_window", ev.done_window >= 0, "0 (no done signal) or more"),
             ("eval.done_margin", ev.done_margin >= 0, "0 or more")]
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
        accel = Accelerator(mixed_precision=tc.mixed_precision, log_with=tracker, project_dir=tc.out_dir)
    except (ValueError, RuntimeError, ImportError) as e:
        raise GuidedError(f"cannot start Accelerate with mixed_precision={tc.mixed_precision}, "
                          f"tracker={tc.tracker}: {str(e).splitlines()[0]}") from None
    if tc.mixed_precision == "fp16" and accel.device.type == "cpu" and accel.is_main_process:
        tqdm.write("note: fp16 mixed precision does nothing on the CPU; bf16 does")
    if tc.num_threads > 0:  # after Accelerate, which sets its own count for CPU processes
        torch.set_num_threads(tc.num_threads)
    return accel


def check_fits(cfg, key: str, latent_shape=None) -> None:
    """Refuse a network (cfg[key]) whose image size or channels differ from the data's (the latents' shape
    (c, h, w) where the data is encoded by a VAE, data.vae)."""
    net, data = cfg[key], cfg.data
    if latent_shape is not None:
        c, h, _ = latent_shape
        if (net.in_channels, net.image_size) != (c, h):
            raise GuidedError(f"data.vae makes {c}x{h}x{h} latents of the {data.image_size}px images but {key} takes "
                              f"{net.in_channels}x{net.image_size}x{net.image_size}: set {key}.in_channels={c} and "
                              f"{key}.image_size={h}")
        return
    if data.image_size != net.image_size:
        raise GuidedError(f"data.image_size={data.image_size} but {key}.image_size={net.image_size}; set them equal")
    if data.channels != net.in_channels:
        raise GuidedError(f"data.channels={data.channels} but {key}.in_channels={net.in_channels}")


def local_batch(tc, world: int, device) -> int:
    """Each process's share of train.batch_size."""
    check_world_size(world, device)
    if tc.batch_size % world:
        raise GuidedError(f"train.batch_size={tc.batch_size} does not split evenly over {world} processes")
    return tc.batch_size // world


def prepare_network(accel, net, tc):
    """(the network as the loop calls it, its AdamW, the bare network) on Accelerate's device."""
    opt = adamw(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, device=accel.device,
                fused=tc.fused_optimizer)
    model, opt = accel.prepare(speed_up(net, channels_last=tc.channels_last), opt)
    bare = accel.unwrap_model(model)
    return (torch.compile(model) if tc.compile else model), opt, bare


def set_lr(opt, tc, step: int) -> None:
    """train.lr, annealed linearly to 0 over train.steps with train.anneal_lr (as the reference)."""
    lr = tc.lr * (1 - step / tc.steps) if tc.anneal_lr else tc.lr
    for group in opt.param_groups:
        group["lr"] = lr


def microbatches(batch: dict, size: int) -> list[dict]:
    """The batch in chunks of `size` examples (0: one chunk)."""
    n = len(batch["x"])
    size = n if size <= 0 else size
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def optimizer_step(accel, opt, bad: torch.Tensor) -> torch.Tensor:
    """The optimizer step unless `bad` (a non-finite loss or gradient); returns `took` on the device.
    A fused AdamW skips it on the device through its found_inf input (the GradScaler's way: neither
    weights, moments nor step count move); fp16's scaler skips a non-finite step itself and backs
    off its scale; any other optimizer needs `bad` on the host: free on the CPU, a wait on a GPU."""
    inner = opt.optimizer  # under Accelerate's wrapper
    if accel.scaler is not None:
        opt.step()
        return ~bad & (not accel.optimizer_step_was_skipped)
    if inner.defaults.get("fused"):
        inner.found_inf = bad.float()
        try:
            opt.step()
        finally:
            del inner.found_inf
    elif not bad.item():
        opt.step()
    return ~bad


class BadSteps:
    """Steps skipped for a non-finite loss or gradient: the took-flags of the steps since the last
    read (`unread`, on the device), read once per log interval; too many in a row stop the run."""

    def __init__(self, max_in_row: int, note):
        self.max_in_row, self.note = max_in_row, note
        self.total, self.in_row, self.unread = 0, 0, []

    def read(self, step: int, last_ckpt) -> None:
        """Count the skipped steps since the last read, step by step, as they happened."""
        if not self.unread:
            return
        flags, first = torch.stack(self.unread).tolist(), step - len(self.unread) + 1
        self.unread = []
        for i, took in enumerate(flags):
            self.count(first + i, took, last_ckpt)

    def count(self, step: int, took: bool, last_ckpt) -> None:
        if took:
            self.in_row = 0
            return
        self.total, self.in_row = self.total + 1, self.in_row + 1
        self.note(f"step {step}: non-finite loss or gradient, step skipped "
                  f"({self.in_row} in a row, {self.total} in all)")
        if self.in_row >= self.max_in_row:
            raise GuidedError(f"stopping at step {step}: {self.in_row} non-finite steps in a row "
                              f"(train.max_bad_steps); last good checkpoint: {last_ckpt or 'none saved yet'}")


def stop_agreed(stop, accel, read: bool) -> bool:
    """A stop request (guided.signals.StopRequest): in one process as soon as it comes; with several,
    all must stop at the same step, so they agree on it at the reads of the log interval."""
    if accel.num_processes == 1:
        return stop.by is not None
    if not read:
        return False
    flag = accel.reduce(torch.tensor(float(stop.by is not None), device=accel.device), reduction="sum")
    if flag.item() > 0 and stop.by is None:
        stop.by = "a stop request in another process"
    return stop.by is not None


class RunLog:
    """What a run tells: lines on the console and, from the main process, the run files,
    out_dir/metrics.jsonl and the trackers."""

    def __init__(self, accel, out_dir: Path):
        self.accel, self.out_dir = accel, out_dir

    def print(self, *args):
        if self.accel.is_main_process:
            tqdm.write(" ".join(str(a) for a in args))

    def start(self, cfg, label_map):
        """config.yaml and label_map.json into the run folder; the trackers."""
        if self.accel.is_main_process:
            ck.write_run_files(self.out_dir, cfg, label_map)
            self.print(f"writing config.yaml, label_map.json, metrics.jsonl and every {cfg.train.save_every} "
                       f"steps (train.save_every) ckpt-*.pt, model.pt and ema.pt into {self.out_dir}")
        if self.accel.log_with:
            self.accel.init_trackers("tb", config=flat_hparams(cfg))

    def log(self, meter, bar, window, *, step: int, bad_total: int, lr: float, last_ckpt):
        """The losses per quarter since the last log (one host read), the speed and the learning rate."""
        stats = meter.flush(self.accel)
        now = time.time()
        stats["images_per_s"] = window[1] / max(now - window[0], 1e-9)
        stats["bad_steps"], stats["lr"] = bad_total, lr
        window[:] = [now, 0]
        self.record(stats, step, last_ckpt)
        if "loss" in stats:
            bar.set_postfix(loss=f"{stats['loss']:.4g}", img_s=f"{stats['images_per_s']:.1f}", refresh=False)
        quarters = " ".join(f"{stats[f'loss_q{i}']:.4g}" for i in range(4) if f"loss_q{i}" in stats)
        self.print(f"step {step}: loss {stats.get('loss', float('nan')):.4g} (quarters {quarters}) "
                   f"{stats['images_per_s']:.1f} img/s")
        return stats

    def record(self, stats: dict, step: int, last_ckpt):
        """Send to the trackers and append to out_dir/metrics.jsonl (main process)."""
        if self.accel.log_with:
            self.accel.log(stats, step=step)
        if self.accel.is_main_process:
            try:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **stats}) + "\n")
            except OSError as e:  # disk full: stop with one line (the last checkpoint is intact)
                raise GuidedError(f"cannot write {self.out_dir / 'metrics.jsonl'}: {e.strerror or e}; "
                                  f"last checkpoint: {last_ckpt or 'none saved yet'}") from None
