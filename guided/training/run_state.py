"""A training run's state: random generators, EMA weights, checkpoints, resume, snapshots.

Determinism: every random draw of the loop comes from generators saved in the checkpoint --
`gen` (CPU: timesteps, label dropout), `noise_gen` (on the device: the diffusion noise),
torch's global RNG (dropout layers) -- and the batch stream restarts at its saved position,
so on CPU a resumed run reaches the same weights, bit for bit, as an uninterrupted one.

Parts a trainer adds (the loss-aware timestep sampler, the classifier's calibration) are
registered by name (`register`); each is saved under its name and loaded back on resume.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guided.config import to_yaml
from guided.errors import GuidedError
from guided.networks import checkpoints as weights
from guided.networks.adm import load_state_dict_strict
from guided.training import checkpoints as ck
from guided.training.meters import derive_seed


class EMA:
    """Exponential moving averages of a network's parameters at several rates (`averages`:
    rate as text -> list of float32 tensors)."""

    def __init__(self, net, rates, warmup: bool):
        self.net, self.rates, self.warmup = net, [float(r) for r in rates], warmup
        self.params = [p for p in net.parameters()]
        self.averages = {str(r): [p.detach().float().clone() for p in self.params] for r in self.rates}

    @torch.no_grad()
    def update(self, took: torch.Tensor, step: int):
        """ema <- rate * ema + (1 - rate) * params, for every rate (the reference's update_ema), after a
        step that was taken (`took`, a 0-dim flag on the device: 0 leaves the EMA as it was); with
        warmup the rate is at most (1 + k) / (10 + k) at step k, so a short run's EMA does not keep
        a share rate^k of the random initial weights."""
        src, took = [p.detach().float() for p in self.params], took.to(torch.float32)
        cap = (1 + step) / (10 + step) if self.warmup else 1.0
        for rate, ema in zip(self.rates, self.averages.values()):  # a list of weights: one tensor weight
            torch._foreach_lerp_(ema, src, [(1.0 - min(rate, cap)) * took] * len(ema))  # is read back as a number

    def state_dicts(self) -> dict:
        """rate -> a state dict of the network with the averaged parameters."""
        base = self.net.state_dict()
        names = [n for n, _ in self.net.named_parameters()]
        return {rate: {**base, **dict(zip(names, ema))} for rate, ema in self.averages.items()}

    def load(self, saved: dict, device, note) -> None:
        names = [n for n, _ in self.net.named_parameters()]
        for rate in self.averages:
            if rate in saved:
                self.averages[rate] = [saved[rate][n].float().to(device).clone() for n in names]
            else:
                note(f"note: checkpoint has no EMA at rate {rate}; starting it from the current weights")
                self.averages[rate] = [p.detach().float().clone() for p in self.params]


class Generators:
    """The run's random streams, per process: torch's, Python's and numpy's global ones, and
    `gen` (CPU) and `noise_gen` (on the device) for the loop's own draws."""

    def __init__(self, rank: int, device):
        self.rank, self.device = rank, device

    def seed(self, seed: int, step: int = 0):
        torch.manual_seed(derive_seed(seed, self.rank, step, 0))  # dropout
        random.seed(derive_seed(seed, self.rank, step, 1))
        np.random.seed(derive_seed(seed, self.rank, step, 2) % 2**32)
        self.gen = torch.Generator().manual_seed(derive_seed(seed, self.rank, step, 3))
        self.noise_gen = torch.Generator(self.device).manual_seed(derive_seed(seed, self.rank, step, 4))

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = dict(torch=torch.get_rng_state(), python=random.getstate(), gen=self.gen.get_state(),
                     noise_gen=self.noise_gen.get_state(),
                     numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, s: dict):
        torch.set_rng_state(s["torch"])
        random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
        name, keys, *rest = s["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        self.gen.set_state(s["gen"])
        self.noise_gen.set_state(s["noise_gen"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state(s["cuda"])


@dataclass
class Resumed:
    """Where a resumed run continues: its step, skipped steps so far, checkpoint and data position."""

    step: int
    bad_total: int
    path: Path
    data: dict


class RunState:
    """What a checkpoint holds and how it is written and read back, for one trainer.

    `save(step, bad_total, stream)` writes ckpt-<step>.pt (atomically), model.pt and ema.pt;
    `resume(True)` loads the newest good checkpoint (or refuses to overwrite a run without it)."""

    def __init__(self, accel, cfg, *, kind: str, label_map, net, opt, ema: EMA, note):
        self.accel, self.cfg, self.kind, self.label_map = accel, cfg, kind, label_map
        self.net, self.opt, self.ema, self.note = net, opt, ema, note
        self.out_dir, self.rank, self.world = Path(cfg.train.out_dir), accel.process_index, accel.num_processes
        self.rngs = Generators(self.rank, accel.device)
        self.rngs.seed(cfg.train.seed)
        self.parts: dict = {}

    def register(self, name: str, part) -> None:
        """Save `part.state_dict()` under `name` in every checkpoint; load it back on resume."""
        if name in self.parts or name in ("model", "ema", "optimizer", "rng", "data", "step"):
            raise ValueError(f"run state {name!r} is taken")
        self.parts[name] = part

    # -- writing ------------------------------------------------------------------------------
    def checkpoint(self, step: int, bad_total: int, stream) -> dict:
        """The full training state (a collective: every process takes part)."""
        from accelerate.utils import gather_object

        per_rank = gather_object([dict(rng=self.rngs.state_dict(), data=stream.state())])
        return dict(kind=self.kind, config=to_yaml(self.cfg), label_map=self.label_map.to_dict(),
                    model=self.net.state_dict(), ema=self.ema.state_dicts(), optimizer=self.opt.state_dict(),
                    scaler=self.accel.scaler.state_dict() if self.accel.scaler is not None else None,
                    world_size=self.world, rng=[r["rng"] for r in per_rank], data=[r["data"] for r in per_rank],
                    bad_total=bad_total, **{name: part.state_dict() for name, part in self.parts.items()})

    def save(self, step: int, bad_total: int, stream) -> Path | None:
        """Write the checkpoint of `step` (main process); its path there, None elsewhere."""
        state, path = self.checkpoint(step, bad_total, stream), None
        if self.accel.is_main_process:
            try:
                path = self.write(state, step)
            except OSError as e:
                raise GuidedError(f"cannot write a checkpoint into {self.out_dir}: {e}") from None
        self.accel.wait_for_everyone()
        return path

    def write(self, state: dict, step: int) -> Path:
        tc = self.cfg.train
        path = ck.save_checkpoint(self.out_dir, step, state, tc.keep_checkpoints)
        common = dict(kind=self.kind, cfg=self.cfg, label_map=self.label_map, step=step, dtype=tc.export_dtype,
                      calibration=state.get("calibration"))
        weights.export_weights(self.out_dir / "model.pt", state["model"], which="model", **common)
        if state["ema"]:
            rate, sd = next(iter(state["ema"].items()))
            weights.export_weights(self.out_dir / "ema.pt", sd, which=f"ema:{rate}", **common)
        return path

    def export_snapshot(self, step: int) -> Path | None:
        """out_dir/ema_step{N}.pt: the first EMA's weights now (main process; an early snapshot is a weak guide)."""
        if not (self.accel.is_main_process and self.ema.averages):
            return None
        rate, sd = next(iter(self.ema.state_dicts().items()))
        path = self.out_dir / f"ema_step{step}.pt"
        try:
            weights.export_weights(path, sd, which=f"ema:{rate}", kind=self.kind, cfg=self.cfg,
                                   label_map=self.label_map, step=step, dtype=self.cfg.train.export_dtype)
        except OSError as e:
            raise GuidedError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    # -- reading ------------------------------------------------------------------------------
    def resume(self, resume: bool) -> Resumed | None:
        """Load the newest good checkpoint (with --resume); refuse to overwrite a run without it."""
        found = ck.list_checkpoints(self.out_dir)
        if not resume:
            if found:
                raise GuidedError(f"{self.out_dir} already holds checkpoints (newest {found[-1][1].name}); "
                                  f"pass --resume to continue, or choose another train.out_dir")
            return None
        if self.accel.is_main_process:  # temp files of a write that a killed run never finished
            for stale in ck.remove_stale_temp_files(self.out_dir):
                self.note(f"note: removed {stale.name}, left by an interrupted write")
        latest = ck.latest_checkpoint(self.out_dir)
        if latest is None:
            self.note(f"--resume: no checkpoint in {self.out_dir} yet, starting from scratch")
            return None
        return self.load(*latest)

    def load(self, path, state: dict) -> Resumed:
        if state.get("kind") != self.kind:
            raise GuidedError(f"checkpoint {path} is a {state.get('kind')} checkpoint, not a {self.kind} one")
        load_state_dict_strict(self.net, state["model"], what=f"checkpoint {path}")
        self.ema.load(state["ema"], self.accel.device, self.note)
        try:
            self.opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise GuidedError(f"checkpoint {path}: optimizer state does not fit: {str(e).splitlines()[0]}") from None
        if state.get("scaler") and self.accel.scaler is not None:
            self.accel.scaler.load_state_dict(state["scaler"])
        for name, part in self.parts.items():
            if state.get(name):
                part.load_state_dict(state[name])
        step = int(state["step"])
        self.note(f"resumed from {path} at step {step}")
        resumed = Resumed(step, int(state.get("bad_total", 0)), path, state["data"][self.rank] if state.get(
            "world_size") == self.world else {"epoch": int(state["data"][0]["epoch"]) + 1, "step": 0})
        if state.get("world_size") == self.world:
            self.rngs.load_state_dict(state["rng"][self.rank])
        else:
            self.note(f"note: the checkpoint was written by {state.get('world_size')} processes, this run has "
                      f"{self.world}: random streams are reseeded and data restarts at the next epoch")
            self.rngs.seed(self.cfg.train.seed, step)
        return resumed
