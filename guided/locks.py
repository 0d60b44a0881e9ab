"""One run per folder: an exclusive lock file, held by the first process of a run.

Sampling (OUT/.lock) and training (train.out_dir/.lock) take the same lock, so a
second run on a folder in use is refused in one line instead of mixing its files
with the first one's. A lock whose process is dead (killed, machine restarted) is
stale and reclaimed. Under `accelerate launch` only rank 0 takes it and every
rank learns the outcome, so all of them stop together. `check_world_size`
refuses processes that a launcher started as a group but that each run alone.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from guided.errors import GuidedError


class OutputLock:
    """An exclusive lock file in a folder: two runs cannot write one folder at once.
    `option` names the setting that picks the folder, for the error message."""

    def __init__(self, out_dir: Path, option: str = "--out"):
        self.path, self.option = Path(out_dir) / ".lock", option

    def __enter__(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = self.path.read_text().strip() if self.path.exists() else "?"
            if pid.isdigit() and not _alive(int(pid)):
                self.path.unlink(missing_ok=True)
                return self.__enter__()
            raise GuidedError(f"{self.path.parent} is in use by another run (pid {pid}); wait for it or "
                              f"choose another {self.option}") from None
        except OSError as e:  # a read-only or full disk
            raise GuidedError(f"cannot use {self.path.parent} as the output folder: {e.strerror or e}") from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def lock_folder(out_dir: Path, option: str = "--out") -> OutputLock:
    """Create out_dir if needed and take its lock (release it with .release())."""
    out_dir = Path(out_dir)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        raise GuidedError(f"cannot use {out_dir} as the output folder: {e.strerror or e}") from None
    return OutputLock(out_dir, option).__enter__()


def first_rank(fn, rank: int, world_size: int):
    """fn() on rank 0 only (its result there, None elsewhere). A GuidedError it raises is
    raised on every rank, so no process waits forever at a barrier for one that gave up."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except GuidedError as e:
            error = str(e)
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
    if error:
        raise GuidedError(error)
    return result


def check_world_size(num_processes: int, device) -> None:
    """Refuse a process that its launcher counted as one of WORLD_SIZE but that runs alone:
    `accelerate launch --multi_gpu` on a machine without GPUs starts N copies that each
    believe they are rank 0 of 1, and would all write the same files."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > num_processes:
        raise GuidedError(f"this process was started as one of {launched} (WORLD_SIZE={launched}) but runs alone on "
                          f"{device}, as would every copy, all writing the same files; on CPUs launch with "
                          f"ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {launched} ...")
