"""The one place that chooses the torch device and the mixed-precision context.

CUDA when present (bf16 autocast there), CPU otherwise; the caller states the choice in its log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from node.errors import TrainingError

__all__ = ["choose_device", "autocast", "describe_device"]


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1') or the best available device."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("CUDA was requested but is not available", requested)
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; full float32 on CPU (bf16 on CPU is slower there, not faster)."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)}, bf16 autocast)"
    return f"cpu ({torch.get_num_threads()} threads, float32)"
