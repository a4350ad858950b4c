"""Training a restoration network on an array dataset (a pool, or a site's real slices).

What it does: clean physical-unit images -> (degraded input, clean target) pairs in the network's
intensity space -> a fixed number of optimiser steps -> a model file that holds everything needed
to rebuild and evaluate the network (name, constructor config, state_dict, task, modality,
degradation config, intensity mapping). It never reads a site's holdout; the coordinator trains on
the pool only.

Intensity space: CT is mapped by one fixed HU window (default [-1024, 3071] HU, the store's) to
[0, 1]; MR / PET / other images by each clean image's own min / max (the span its store slice was
normalised to), applied identically to its degraded input.

Habits shared with the generator's training: one checkpoint file written atomically
(``protocols.files``; loaded back with ``torch.load(weights_only=True)``: data, never code),
``--resume`` continues the exact same run (batch order and augmentation depend on (seed, step)
only), a progress bar on stderr, one JSON line of losses per logged step.

Learning rate: Adam, by default flat at the preset's rate and then a cosine decay to zero over
the last 20 % of the steps (``lr_schedule: cosine``, ``decay_fraction: 0.2``), so the model kept
at the end is the low-noise end of a decayed run and not one noisy iterate of a constant rate
(comparisons of arms are only as precise as that). The rate is a pure function of the step
(``learning_rate``), so ``--resume`` needs no scheduler state; FedAvg's local runs use
``schedule_offset`` / ``schedule_steps`` to follow one global schedule across rounds.
``lr_schedule: constant`` keeps the rate fixed (model files made before 2026-12-06 were trained
that way). Multi-GPU runs go
through ``torchrun`` only: when torchrun's environment is present, the process group is
initialised, batches come from a ``DistributedSampler`` and rank 0 alone writes files.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from coordinator.restore.degrade import DegradationConfig, degrade_batch
from coordinator.restore.metrics import CT_WINDOW_HU
from coordinator.restore.nets import build_network
from protocols.errors import OperationError, UsageError
from protocols.files import atomic_write_bytes, atomic_write_text, sha256_hex

__all__ = [
    "MODEL_FORMAT",
    "CHECKPOINT_FORMAT",
    "PRESETS",
    "Preset",
    "TrainSettings",
    "Normalisation",
    "settings_for",
    "learning_rate",
    "LR_SCHEDULES",
    "DEFAULT_DECAY_FRACTION",
    "MODEL_FILE_TOP_LEVEL",
    "make_pairs",
    "train_network",
    "save_model",
    "load_model",
    "model_from_state",
    "model_state",
    "model_bytes",
    "data_digest",
    "train_from_pool",
]

MODEL_FORMAT = "synthfed-restore-model/1"
LR_SCHEDULES = ("cosine", "constant")
# flat, then a cosine to zero over the last 20 % of the steps (measured in bench/RESULTS.md,
# 2026-12-06: better than a cosine over all steps and than a constant rate at 1,500 steps)
DEFAULT_DECAY_FRACTION = 0.2
# settings a model file holds at its top level; the others are under "train"
MODEL_FILE_TOP_LEVEL = ("net", "net_config", "task", "modality", "degradation", "normalisation")
CHECKPOINT_FORMAT = "synthfed-restore-checkpoint/1"


@dataclass(frozen=True)
class Preset:
    """A step budget and network sizes that fit a machine class."""

    name: str
    steps: int
    batch_size: int
    lr: float
    log_every: int
    checkpoint_every: int
    net_configs: dict[str, dict[str, Any]]


PRESETS: dict[str, Preset] = {
    # tests and CI: seconds on one core
    "tiny": Preset("tiny", steps=12, batch_size=4, lr=1e-3, log_every=2, checkpoint_every=6,
                   net_configs={
                       "redcnn": {"features": 8, "num_layers": 3},
                       "dncnn": {"features": 8, "depth": 4},
                       "srcnn": {"features": [16, 8], "kernel_sizes": [5, 3, 3]},
                       "edsr": {"features": 8, "num_blocks": 2},
                   }),
    # a 2-core CPU: minutes at 64x64
    "cpu": Preset("cpu", steps=1500, batch_size=16, lr=5e-4, log_every=25, checkpoint_every=250,
                  net_configs={
                      "redcnn": {"features": 32, "num_layers": 5},
                      "dncnn": {"features": 32, "depth": 10},
                      "srcnn": {"features": [64, 32], "kernel_sizes": [9, 5, 5]},
                      "edsr": {"features": 32, "num_blocks": 6},
                  }),
    # one GPU: the papers' sizes
    "gpu": Preset("gpu", steps=20000, batch_size=64, lr=2e-4, log_every=100,
                  checkpoint_every=2000,
                  net_configs={"redcnn": {}, "dncnn": {}, "srcnn": {}, "edsr": {}}),
}


@dataclass(frozen=True)
class Normalisation:
    """How physical images map to the network's [0, 1]-ish space (see module docstring)."""

    kind: str  # "ct-window" or "per-image-minmax"
    ct_window_hu: tuple[float, float] = CT_WINDOW_HU

    def __post_init__(self) -> None:
        if self.kind not in ("ct-window", "per-image-minmax"):
            raise ValueError(f"unknown normalisation {self.kind!r}")

    @classmethod
    def for_modality(
        cls, modality: str, ct_window_hu: tuple[float, float] = CT_WINDOW_HU
    ) -> Normalisation:
        if modality == "CT":
            return cls("ct-window", (float(ct_window_hu[0]), float(ct_window_hu[1])))
        return cls("per-image-minmax")

    def mapping(self, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (scale, offset) with ``physical = normalised * scale + offset``."""
        n = clean.shape[0]
        if self.kind == "ct-window":
            low, high = self.ct_window_hu
            return np.full(n, high - low, np.float64), np.full(n, low, np.float64)
        flat = np.asarray(clean, dtype=np.float64).reshape(n, -1)
        low, high = flat.min(axis=1), flat.max(axis=1)
        span = high - low
        return np.where(span > 0, span, 1.0), low

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ct_window_hu": [float(v) for v in self.ct_window_hu]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalisation:
        window = data.get("ct_window_hu", list(CT_WINDOW_HU))
        return cls(str(data["kind"]), (float(window[0]), float(window[1])))


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides a training run (recorded in the model file)."""

    net: str
    task: str
    modality: str
    net_config: dict[str, Any] = field(default_factory=dict)
    preset: str = "cpu"
    steps: int = 1500
    batch_size: int = 16
    lr: float = 5e-4
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 250
    flips: bool = True
    lr_schedule: str = "cosine"
    decay_fraction: float = DEFAULT_DECAY_FRACTION  # cosine: the last fraction decays
    schedule_offset: int = 0  # steps of the global schedule already run (FedAvg rounds)
    schedule_steps: int = 0  # length of the global schedule; 0 = steps
    degradation: dict[str, Any] = field(default_factory=dict)
    normalisation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in ("denoise", "sr"):
            raise ValueError(f"task must be 'denoise' or 'sr', not {self.task!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError("lr must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {list(LR_SCHEDULES)}, not {self.lr_schedule!r}"
            )
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], not {self.decay_fraction}")
        if self.schedule_offset < 0 or self.schedule_steps < 0:
            raise ValueError("schedule_offset and schedule_steps must be >= 0")
        if self.schedule_steps and self.schedule_offset + self.steps > self.schedule_steps:
            raise ValueError(
                f"steps {self.schedule_offset}..{self.schedule_offset + self.steps} run past "
                f"the schedule's {self.schedule_steps}"
            )


def learning_rate(settings: TrainSettings, step: int) -> float:
    """The rate of local step ``step`` (0-based): a pure function, so resume needs no state.

    cosine: flat at ``lr`` for the first ``1 - decay_fraction`` of the schedule, then
    ``lr * (1 + cos(pi * u)) / 2`` with ``u`` going from 0 to 1 over the rest (global step
    ``t = schedule_offset + step`` of a schedule ``T`` steps long); ``decay_fraction`` 1 is the
    plain cosine from the first step.
    """
    if settings.lr_schedule == "constant":
        return settings.lr
    total = settings.schedule_steps or settings.steps
    t = min(settings.schedule_offset + step, total)
    flat = total * (1.0 - settings.decay_fraction)
    if t <= flat:
        return settings.lr
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * (t - flat) / (total - flat)))


def settings_for(
    net: str,
    task: str,
    modality: str,
    preset: str = "cpu",
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    degradation: DegradationConfig | None = None,
    ct_window_hu: tuple[float, float] = CT_WINDOW_HU,
    net_config: dict[str, Any] | None = None,
    lr_schedule: str = "cosine",
    decay_fraction: float = DEFAULT_DECAY_FRACTION,
) -> TrainSettings:
    """Resolved settings of a preset, with explicit overrides."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if task == "denoise" and modality != "CT":
        raise UsageError(
            f"the low-dose simulation works in Hounsfield units: task denoise needs CT, "
            f"not {modality}"
        )
    p = PRESETS[preset]
    cfg = dict(p.net_configs.get(net, {}))
    cfg.update(net_config or {})
    deg = degradation or DegradationConfig(task=task)  # type: ignore[arg-type]
    if deg.task != task:
        raise UsageError(f"degradation is for task {deg.task}, training task is {task}")
    total = steps if steps is not None else p.steps
    try:
        return TrainSettings(
            net=net, task=task, modality=modality, net_config=cfg, preset=preset,
            steps=total, batch_size=batch_size or p.batch_size, lr=p.lr, seed=seed,
            lr_schedule=lr_schedule, decay_fraction=decay_fraction,
            log_every=max(1, min(p.log_every, total)),
            checkpoint_every=max(1, min(p.checkpoint_every, total)),
            degradation=deg.to_dict(),
            normalisation=Normalisation.for_modality(modality, ct_window_hu).to_dict(),
        )
    except ValueError as exc:  # a bad value from a command line or a config: the user's error
        raise UsageError(str(exc)) from None


def make_pairs(
    clean: np.ndarray,
    degradation: DegradationConfig,
    normalisation: Normalisation,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, scale, offset): degraded and clean images in the network space.

    ``clean`` is float32 [N, S, S] in physical units. The degradation runs in physical units
    (the low-dose simulation needs HU) with per-image seeds (see ``degrade.image_seed``).
    """
    clean = np.asarray(clean, dtype=np.float32)
    if clean.ndim != 3 or clean.shape[0] == 0:
        raise UsageError(f"no images to train on (shape {clean.shape})")
    degraded = degrade_batch(clean, degradation, seed)
    scale, offset = normalisation.mapping(clean)
    s, o = scale[:, None, None], offset[:, None, None]
    targets = (clean - o) / s
    inputs = (degraded - o) / s
    if normalisation.kind == "ct-window":
        targets = np.clip(targets, 0.0, 1.0)
    return inputs.astype(np.float32), targets.astype(np.float32), scale, offset


def data_digest(images: np.ndarray) -> str:
    """Digest of the exact training images (recorded in the model file)."""
    return sha256_hex(np.ascontiguousarray(images, dtype=np.float32).tobytes())


# ---- model files -------------------------------------------------------------------------


def _to_bytes(obj: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_model(path: Path, state: dict[str, Any]) -> str:
    """Write a model file atomically; returns the sha256 of its bytes."""
    data = _to_bytes({"format": MODEL_FORMAT, **state})
    atomic_write_bytes(path, data)
    return sha256_hex(data)


def _load(data: bytes, fmt: str, where: str) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a damaged file
        raise UsageError(f"model file is unreadable: {type(exc).__name__}", where) from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise UsageError(f"not a {fmt} file", where)
    return state


def load_model(source: bytes | Path, where: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network from a model file (path or bytes); returns (net in eval mode, info).

    ``info`` holds everything but the weights: net, net_config, task, modality, degradation,
    normalisation, train (summary) and ``digest`` (sha256 of the file's bytes).
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        where = where or "model blob"
    else:
        path = Path(source)
        if not path.is_file():
            raise UsageError("model file not found", str(path))
        data = path.read_bytes()
        where = where or str(path)
    state = _load(data, MODEL_FORMAT, where)
    net = model_from_state(state, where)
    info = {k: v for k, v in state.items() if k not in ("state_dict", "format")}
    info["digest"] = sha256_hex(data)
    return net, info


def model_from_state(state: dict[str, Any], where: str = "model") -> nn.Module:
    try:
        net = build_network(str(state["net"]), dict(state["net_config"]))
        net.load_state_dict(state["state_dict"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise UsageError(f"model file does not rebuild: {exc}", where) from None
    net.eval()
    return net


# ---- distributed (torchrun) ----------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str | None) -> _Dist:
    """torchrun's environment -> an initialised process group; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
            backend = "nccl"
        else:
            dev = torch.device("cpu")
            backend = "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return _Dist(dist.get_rank(), dist.get_world_size(), dev)
    if device:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("CUDA was requested but is not available", device)
    else:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _Dist(0, 1, dev)


def _barrier(dist_info: _Dist) -> None:
    if dist_info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ---- the loop ------------------------------------------------------------------------------


def _batches(
    n: int, settings: TrainSettings, dist_info: _Dist, start_step: int
) -> Iterator[tuple[int, list[int]]]:
    """(step, indices) from ``start_step`` on; the order depends on (seed, step) only."""
    from torch.utils.data import DistributedSampler

    sampler: DistributedSampler[int] = DistributedSampler(
        cast(Any, range(n)), num_replicas=dist_info.world, rank=dist_info.rank,
        shuffle=True, seed=settings.seed, drop_last=False,
    )
    per_epoch = max(1, math.ceil(len(sampler) / settings.batch_size))
    step = start_step
    epoch = start_step // per_epoch
    skip = start_step % per_epoch
    while step < settings.steps:
        sampler.set_epoch(epoch)
        order = list(sampler)
        for b in range(skip, per_epoch):
            if step >= settings.steps:
                return
            yield step, order[b * settings.batch_size:(b + 1) * settings.batch_size]
            step += 1
        skip = 0
        epoch += 1


def _augment(x: torch.Tensor, y: torch.Tensor, seed: int, step: int) -> tuple[torch.Tensor, ...]:
    """Random flips / 90-degree rotations, the same for input and target, seeded by step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    k = int(torch.randint(0, 4, (1,), generator=g))
    flip = bool(torch.randint(0, 2, (1,), generator=g))
    x, y = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (2, 3))
    if flip:
        x, y = torch.flip(x, (3,)), torch.flip(y, (3,))
    return x, y


@contextmanager
def _progress(total: int, initial: int, enabled: bool, desc: str) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, file=sys.stderr, disable=not enabled,
               unit="step", dynamic_ncols=True, desc=desc)
    try:
        yield bar
    finally:
        bar.close()


def train_network(
    inputs: np.ndarray,
    targets: np.ndarray,
    settings: TrainSettings,
    out_dir: Path | None,
    *,
    resume: bool = False,
    progress: bool = True,
    device: str | None = None,
    extra: dict[str, Any] | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``settings.net`` on (inputs, targets) [N, S, S]; returns (net, summary).

    With ``out_dir``: ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end,
    ``model.pt`` at the end, ``losses.jsonl``; ``resume`` continues from ``checkpoint.pt``.
    ``extra`` is recorded in the model file (data source, digests). ``initial_state`` starts
    from given weights (FedAvg local rounds) instead of the seeded initialisation.
    """
    if inputs.shape != targets.shape or inputs.ndim != 3:
        raise UsageError(f"inputs {inputs.shape} and targets {targets.shape} must be [N, S, S]")
    dist_info = _init_distributed(device)
    torch.manual_seed(settings.seed)
    net = build_network(settings.net, settings.net_config).to(dist_info.device)
    if initial_state is not None:
        net.load_state_dict(initial_state)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr)
    start = 0
    ckpt_path = out_dir / "checkpoint.pt" if out_dir is not None else None
    if resume:
        if ckpt_path is None or not ckpt_path.exists():
            raise UsageError("nothing to resume: no checkpoint.pt", str(out_dir))
        state = _load(ckpt_path.read_bytes(), CHECKPOINT_FORMAT, str(ckpt_path))
        if state.get("settings") != _settings_dict(settings):
            raise UsageError(
                "checkpoint was made with other settings; start a new run instead of --resume",
                str(ckpt_path),
            )
        net.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model: nn.Module = net
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            net, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None
        )
    x_all = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[:, None]
    y_all = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))[:, None]
    losses_file = None
    if out_dir is not None and dist_info.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        losses_path = out_dir / "losses.jsonl"
        if resume and losses_path.exists():
            kept = [line for line in losses_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] < start]
            atomic_write_text(losses_path, "".join(line + "\n" for line in kept))
        elif not resume:
            atomic_write_text(losses_path, "")
        losses_file = open(losses_path, "a", encoding="utf-8")  # noqa: SIM115
    t0 = time.monotonic()
    recent: list[float] = []
    model.train()
    try:
        with _progress(settings.steps, start, progress and dist_info.main,
                       f"train {settings.net}") as bar:
            for step, idx in _batches(inputs.shape[0], settings, dist_info, start):
                x, y = x_all[idx], y_all[idx]
                if settings.flips:
                    x, y = _augment(x, y, settings.seed, step)
                x, y = x.to(dist_info.device), y.to(dist_info.device)
                rate = learning_rate(settings, step)
                for group in optimiser.param_groups:
                    group["lr"] = rate
                optimiser.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise OperationError(f"training diverged at step {step} (loss {value})")
                recent.append(value)
                done = step + 1
                if losses_file is not None and (done % settings.log_every == 0
                                                or done == settings.steps):
                    losses_file.write(json.dumps({
                        "step": step, "loss_mse": float(np.mean(recent)), "lr": rate,
                        "wall_s": round(time.monotonic() - t0, 3),
                    }, sort_keys=True) + "\n")
                    losses_file.flush()
                    bar.set_postfix(loss=f"{np.mean(recent):.2e}")
                    recent = []
                bar.update(1)
                if ckpt_path is not None and (done % settings.checkpoint_every == 0
                                              or done == settings.steps):
                    if dist_info.main:
                        _save_checkpoint(ckpt_path, net, optimiser, done, settings)
                    _barrier(dist_info)
    finally:
        if losses_file is not None:
            losses_file.close()
    net.eval()
    wall = time.monotonic() - t0
    summary: dict[str, Any] = {
        "steps": settings.steps, "resumed_from": start, "wall_s": round(wall, 3),
        "n_images": int(inputs.shape[0]), "world_size": dist_info.world,
        "device": str(dist_info.device),
    }
    if out_dir is not None:
        losses_path = out_dir / "losses.jsonl"
        if losses_path.exists():
            lines = [json.loads(line) for line in
                     losses_path.read_text(encoding="utf-8").splitlines() if line]
            if lines:
                summary["final_loss_mse"] = lines[-1]["loss_mse"]
        if dist_info.main:
            summary["model_digest"] = save_model(
                out_dir / "model.pt", model_state(net, settings, summary, extra)
            )
            summary["model"] = str(out_dir / "model.pt")
        _barrier(dist_info)
    return net, summary


def _settings_dict(settings: TrainSettings) -> dict[str, Any]:
    # round-tripped through JSON so lists / tuples compare equal after a torch.load
    loaded: dict[str, Any] = json.loads(json.dumps(asdict(settings)))
    return loaded


def _save_checkpoint(
    path: Path, net: nn.Module, optimiser: torch.optim.Optimizer, step: int,
    settings: TrainSettings,
) -> None:
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "settings": _settings_dict(settings),
        "state_dict": net.state_dict(), "optimizer": optimiser.state_dict(),
    }
    atomic_write_bytes(path, _to_bytes(state))


def model_state(
    net: nn.Module,
    settings: TrainSettings,
    summary: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of a model file (plain types and tensors only)."""
    train_info = {k: v for k, v in _settings_dict(settings).items()
                  if k not in MODEL_FILE_TOP_LEVEL}
    train_info.update(json.loads(json.dumps(summary or {}, default=str)))
    return {
        "net": settings.net,
        "net_config": json.loads(json.dumps(settings.net_config)),
        "task": settings.task,
        "modality": settings.modality,
        "degradation": json.loads(json.dumps(settings.degradation)),
        "normalisation": json.loads(json.dumps(settings.normalisation)),
        "train": train_info,
        "data": json.loads(json.dumps(extra or {}, default=str)),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }


def model_bytes(
    net: nn.Module, settings: TrainSettings, summary: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """A model file's bytes without writing it (what is sent to the sites)."""
    return _to_bytes({"format": MODEL_FORMAT, **model_state(net, settings, summary, extra)})


# ---- the coordinator's entry point ---------------------------------------------------------


def train_from_pool(
    pool_dir: Path,
    task: str,
    net: str,
    out_dir: Path,
    *,
    preset: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
    lr_schedule: str = "cosine",
    decay_fraction: float = DEFAULT_DECAY_FRACTION,
) -> dict[str, Any]:
    """Train ``net`` for ``task`` on a pool (contract D) only; writes out_dir/model.pt."""
    from coordinator.pool import load_pool

    images, index, manifest = load_pool(pool_dir)
    modalities = sorted({str(line["modality"]) for line in index})
    if len(modalities) != 1:
        raise UsageError(f"the pool holds {modalities or 'no'} modalities; one is needed",
                         str(pool_dir))
    modality = modalities[0]
    existing = (out_dir / "checkpoint.pt").exists() or (out_dir / "model.pt").exists()
    if existing and not (resume or overwrite):
        raise UsageError("a training run exists here: pass --resume or --overwrite", str(out_dir))
    if overwrite and not resume:
        for name in ("checkpoint.pt", "model.pt", "losses.jsonl"):
            (out_dir / name).unlink(missing_ok=True)
    settings = settings_for(net, task, modality, preset, steps=steps, seed=seed,
                            lr_schedule=lr_schedule, decay_fraction=decay_fraction)
    clean = np.asarray(images, dtype=np.float32)
    inputs, targets, _, _ = make_pairs(
        clean, DegradationConfig.from_dict(settings.degradation),
        Normalisation.from_dict(settings.normalisation), seed=seed + 1,
    )
    extra = {
        "source": "pool", "round": manifest.get("round"),
        "pool_counts": manifest.get("counts"),
        "bundles": [b.get("bundle_digest") for b in manifest.get("bundles", [])],
        "data_digest": data_digest(clean),
    }
    _, summary = train_network(inputs, targets, settings, out_dir, resume=resume,
                               progress=progress, device=device, extra=extra)
    return {**summary, "task": task, "net": net, "modality": modality, "preset": preset,
            "round": manifest.get("round"), "n_images": int(clean.shape[0]),
            "out_dir": str(out_dir)}
