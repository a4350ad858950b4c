"""The one place that chooses the torch device and the mixed-precision context.

CUDA when present, CPU otherwise; the caller states the choice in its log. Precision per
network: the diffusion UNet follows the config's ``diffusion_precision`` (``auto``: bf16
autocast on CUDA and on CPUs with native bf16 instructions, AVX512-BF16 or AMX; float32
elsewhere, where bf16 is emulated and slower). On an AMD EPYC with AVX512-BF16 bf16 autocast
made a cpu-preset UNet step 1.7x faster (bench/RESULTS.md, 2026-12-06). The autoencoder's
training steps follow ``ae_train_precision`` the same way (1.8x faster in bf16 on that CPU);
everywhere else on CPU — encoding the train split for stage 2, decoding samples — it stays
float32, because its decoder writes the image and a bf16 output has 8 bits of mantissa. On
CUDA it runs in bf16 autocast throughout, as it always has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

from node.errors import TrainingError
from node.generator.settings import PRECISIONS

__all__ = [
    "Precision",
    "autocast",
    "autoencoder_precision",
    "choose_device",
    "cpu_has_native_bf16",
    "describe_device",
    "resolve_precision",
]

Precision = Literal["float32", "bfloat16"]


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1') or the best available device."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("CUDA was requested but is not available", requested)
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX)."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def resolve_precision(
    device: torch.device, requested: str, key: str = "generator.diffusion_precision"
) -> Precision:
    """The concrete precision of ``requested`` ('auto', 'float32', 'bfloat16') on ``device``.

    ``key`` names the node.yaml setting in the error for an unknown value.
    """
    if requested == "float32":
        return "float32"
    if requested == "bfloat16":
        return "bfloat16"
    if requested != "auto":
        raise TrainingError(
            f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}",
            key,
        )
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def autoencoder_precision(device: torch.device) -> Precision:
    """bf16 autocast on CUDA, float32 on CPU (see the module docstring)."""
    return "bfloat16" if device.type == "cuda" else "float32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """bf16 autocast on ``device`` for ``bfloat16``; plain float32 otherwise."""
    if precision == "bfloat16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def describe_device(
    device: torch.device, unet: Precision, autoencoder: Precision,
    autoencoder_training: Precision | None = None,
) -> str:
    """One line for logs and reports: the device and each network's precision.

    ``autoencoder_training`` is the precision of the autoencoder's training steps, stated
    when it differs from ``autoencoder`` (the precision it encodes and decodes with).
    """
    where = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
             else f"cpu ({torch.get_num_threads()} threads)")
    line = f"{where}, UNet {unet}, autoencoder {autoencoder}"
    if autoencoder_training is not None and autoencoder_training != autoencoder:
        line += f" (trained in {autoencoder_training})"
    return line
