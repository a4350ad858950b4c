"""Reading and writing the generator checkpoint (``models/generator.pt``).

One file holds everything needed to resume training exactly and to sample: weights, EMA
weights, optimiser and LR-scheduler states, the step, RNG state, the full resolved config,
the training-split digest and the latent scale factor. It is written atomically (bytes in
memory, then ``atomic_write_bytes``), so a killed run always leaves the previous checkpoint
whole. It is loaded with ``weights_only=True``: a checkpoint is data, never code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from node.config import NodePaths
from node.errors import TrainingError
from protocols.files import atomic_write_bytes, sha256_hex

__all__ = ["FORMAT", "checkpoint_path", "save_checkpoint", "load_checkpoint", "check_split"]

FORMAT = "synthfed-generator/1"


def checkpoint_path(paths: NodePaths) -> Path:
    return paths.models / "generator.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> str:
    """Write ``state`` atomically; returns the sha256 of the file's bytes."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data, mode=0o600)
    return sha256_hex(data)


def load_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """The checkpoint's state and the sha256 of its bytes."""
    if not path.exists():
        raise TrainingError(
            "no trained generator: run synthfed-node train first", str(path)
        )
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged file
        raise TrainingError(f"checkpoint is unreadable: {type(exc).__name__}", str(path)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"not a {FORMAT} checkpoint", str(path))
    return state, sha256_hex(data)


def check_split(state: dict[str, Any], store_digest: str, where: str) -> None:
    """Refuse a checkpoint trained on another training split than the store's."""
    trained = str(state.get("train_split_digest", ""))
    if trained != store_digest:
        raise TrainingError(
            f"checkpoint was trained on training split {trained[:12]} but the store's training"
            f" split is now {store_digest[:12]}; retrain with --overwrite",
            where,
        )
