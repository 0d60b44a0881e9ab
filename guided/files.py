"""Atomic file writes and checked reads, for every file the library writes or loads.

A write goes into a temporary file in the same folder, is flushed and fsync'ed, then
renamed over its target with os.replace: a crash leaves the old file or the new one,
never a truncated one. `read_file` turns every failure of torch.load into one line.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from guided.errors import GuidedError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
# Test hook (fault injection, tests/test_faults.py): pause this many seconds between writing a
# ckpt-*.pt temp file and renaming it, so a harness can kill the process mid-checkpoint.
PAUSE_ENV = "GUIDED_FAULT_PAUSE_CKPT_WRITE"


CKPT_FORMAT = "guided-checkpoint"  # the header of a full training state (guided.training.checkpoints)
_CKPT_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ckpt-*.pt in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT_NAME.match(p.name))]
    return sorted(found)


def atomic_write(path: str | Path, write: Callable) -> Path:
    """write(f) into a temporary file beside `path`, fsync it, then os.replace it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if path.name.startswith("ckpt-") and os.environ.get(PAUSE_ENV):
                time.sleep(float(os.environ[PAUSE_ENV]))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable (not possible on every platform)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save(obj) onto `path`, atomically."""
    return atomic_write(path, lambda f: _torch_save(obj, f, Path(path)))


def _torch_save(obj, f, path: Path) -> None:
    """torch.save, whose write failures become OSError. Its zip writer reports a failed write
    (ENOSPC on a full disk) as RuntimeError "... unexpected pos ...", not as the OSError it was."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        if shutil.disk_usage(path.parent).free < 1 << 20:  # under 1 MiB left: the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from e
        raise OSError(errno.EIO, f"torch.save failed: {(str(e).strip().splitlines() or ['?'])[-1][:200]}") from e


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def _remedy(what: str, url: Optional[str]) -> str:
    """What to do about a damaged file: a training checkpoint has earlier ones, a weights file
    was copied or downloaded, a released ADM checkpoint comes from the paper's site (`url`)."""
    if what == "checkpoint":
        return "delete it and resume from an earlier one"
    if url is not None:
        return f"download it again ({url})"
    return "copy, export or download it again"


def read_file(path: str | Path, what: str = "checkpoint", url: Optional[str] = None):
    """torch.load(weights_only=True) whose failures are one-line GuidedErrors; `url`: where the file can be
    downloaded (a released checkpoint's address), named in the message."""
    path = Path(path)
    if not path.exists():
        where = f" (download it from {url})" if url else ""
        raise GuidedError(f"{what} {path} does not exist{where}")
    if path.is_dir():
        raise GuidedError(f"{what} {path} is a folder, not a file")
    if path.stat().st_size == 0:
        raise GuidedError(f"{what} {path} is empty (0 bytes): {_remedy(what, url)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zipfile, pickle, EOF and storage errors of a damaged file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        fix = "" if what == "checkpoint" else f": {_remedy(what, url)}"  # (training skips to an older one)
        raise GuidedError(f"{what} {path} is truncated or corrupt ({why[:100]}){fix}") from None
