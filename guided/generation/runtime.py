"""Device and process setup for sampling: plain python or `accelerate launch`."""
from __future__ import annotations

import torch

from guided.errors import GuidedError
from guided.locks import check_world_size


def processes(device_name=None):
    """(device, rank, world size, barrier) under plain python or accelerate launch."""
    from accelerate import PartialState

    check_device(device_name)
    device = device_name or default_device()
    state = PartialState(cpu=device == "cpu") if device in ("cpu", "cuda") else None  # cpu: gloo under a launcher
    if state is None or state.num_processes == 1:
        check_world_size(1, device)
        return device, 0, 1, None
    return str(state.device), state.process_index, state.num_processes, state.wait_for_everyone


def check_device(name) -> None:
    """Refuse a --device torch cannot parse or this machine does not have, in one line."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise GuidedError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise GuidedError(f"--device {name}: no such CUDA device here (use --device cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GuidedError(f"--device {name}: MPS is not available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise GuidedError(f"--device {name}: only cpu, cuda and mps are supported")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


