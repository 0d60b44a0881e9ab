"""A run folder's training checkpoints: ckpt-<step>.pt files, written atomically, newest `keep` kept.

A run directory (train.out_dir) holds config.yaml and label_map.json (written at the start),
ckpt-0001000.pt (the full training state after step 1000) and the weights-only exports
model.pt / ema.pt (guided.networks.checkpoints.export_weights). An old checkpoint is deleted
only once a newer one is complete.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from guided.config import to_yaml
from guided.errors import GuidedError
from guided.files import CKPT_FORMAT, atomic_save, atomic_write_text, list_checkpoints, read_file  # noqa: F401



def load_checkpoint(path: str | Path) -> dict:
    """A full training state written by `save_checkpoint`."""
    state = read_file(path)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise GuidedError(f"{path} is not a training checkpoint of this project (no '{CKPT_FORMAT}' header)")
    return state


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest readable checkpoint and its state; unreadable newer ones are skipped with a warning.
    None when there is none at all; a GuidedError when none of them can be read."""
    found = list_checkpoints(run_dir)
    errors = []
    for _, path in reversed(found):
        try:
            return path, load_checkpoint(path)
        except GuidedError as e:
            errors.append(str(e))
            warnings.warn(f"skipping unreadable checkpoint: {e}", stacklevel=2)
    if errors:
        raise GuidedError(f"no readable checkpoint in {run_dir}: {errors[0]}")
    return None


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of writes that a killed run left half-done (.<name>.*.tmp)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:07d}.pt"


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ckpt-<step>.pt atomically, then delete all but the newest `keep` (>= 1)."""
    path = atomic_save({"format": CKPT_FORMAT, "version": 1, "step": step, **state}, checkpoint_path(run_dir, step))
    for _, old in list_checkpoints(run_dir)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def write_run_files(run_dir: str | Path, cfg, label_map) -> None:
    """config.yaml and label_map.json, the files load_trained reads beside the weights."""
    try:
        atomic_write_text(Path(run_dir) / "config.yaml", to_yaml(cfg))
        if label_map is not None:
            atomic_write_text(Path(run_dir) / "label_map.json", json.dumps(label_map.to_dict(), indent=1) + "\n")
    except OSError as e:  # a read-only or full output folder
        raise GuidedError(f"cannot write into {run_dir}: {e.strerror or e}") from None
