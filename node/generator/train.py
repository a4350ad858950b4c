"""Training the site generator: stage 1 AutoencoderKL, stage 2 latent DiffusionModelUNet.

What this module must never do: read a holdout slice (ARCHITECTURE invariant 3) — it asks the
store for ``records("train")`` and loads exactly those — or download weights (invariant 7).

Exact resumability: the batch of step k is a pure function of (seed, stage, k) (seeded
per-epoch permutations), every random draw of a step comes from a torch.Generator seeded by
(seed, stage, k), and the checkpoint holds weights, EMA, optimiser and scheduler states. So a
run stopped at step n and resumed produces the same losses as one that never stopped. A
checkpoint is written every ``checkpoint_every`` steps, at each stage's end and at the end,
atomically; a Ctrl-C or a kill loses at most the steps since the last one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from node.config import NodeConfig, NodePaths
from node.errors import StoreError, TrainingError
from node.generator.checkpoint import (
    check_split,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
)
from node.generator.device import (
    autocast,
    autoencoder_precision,
    choose_device,
    describe_device,
    resolve_precision,
)
from node.generator.networks import (
    Ema,
    build_autoencoder,
    build_discriminator,
    build_unet,
    make_scheduler,
)
from node.generator.presets import GeneratorConfig, config_from_dict, resolve_config
from node.store import SliceRecord, Store
from protocols.audit import append_audit
from protocols.files import atomic_write_text

__all__ = ["train_generator", "batch_indices", "step_seed", "TrainingData"]

STAGES = ("autoencoder", "diffusion")


# ---- seeding: one helper for every random draw ---------------------------------------------


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integers (stage, step, ...)."""
    state = np.random.SeedSequence([seed, *parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def batch_indices(seed: int, stage: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Indices of the batch of ``step``: consecutive slices of seeded per-epoch permutations."""
    start = step * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    filled = 0
    while filled < batch_size:
        epoch, offset = divmod(start + filled, n)
        perm = np.random.default_rng([seed, stage, epoch]).permutation(n)
        take = min(batch_size - filled, n - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def loss_weights(alphas_cumprod: torch.Tensor, cfg: GeneratorConfig) -> torch.Tensor:
    """Per-sample weights of the stage-2 MSE at each sample's ``alphas_cumprod``.

    ``uniform``: 1. ``min_snr`` (Hang et al. 2023, arXiv 2303.09556, eq. 5 and its v form):
    the objective's MSE already weighs the x0 error by SNR (epsilon) or SNR + 1 (v), so the
    weight ``min(SNR, gamma) / SNR`` resp. ``min(SNR, gamma) / (SNR + 1)`` caps the x0 weight at
    gamma: the nearly clean timesteps stop dominating the gradient.
    """
    if cfg.loss_weighting == "uniform":
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    capped = torch.clamp(snr, max=cfg.min_snr_gamma)
    return capped / (snr + 1.0) if cfg.prediction_type == "v_prediction" else capped / snr


def lr_lambda_for(total: int, warmup_fraction: float) -> Any:
    warmup = max(1, int(round(total * warmup_fraction)))

    def factor(step: int) -> float:
        # Linear warm-up then cosine decay to 5 % of the peak.
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# ---- data --------------------------------------------------------------------------------


class TrainingData:
    """The train split in memory, with class indices when conditioning is on."""

    def __init__(self, images: np.ndarray, records: list[SliceRecord], conditioning: str) -> None:
        self.images = images
        self.n = len(records)
        self.size = int(images.shape[-1])
        #: what the guard checks before it screens this generator's samples: every slice it
        #: learnt from must be in the guard's reference (node.guard.run)
        self.pixel_digests = sorted({rec.pixel_digest for rec in records})
        counts: dict[str, int] = {}
        for rec in records:
            counts[rec.modality] = counts.get(rec.modality, 0) + 1
        self.counts_by_modality = dict(sorted(counts.items()))
        self.modalities = sorted(counts)
        if conditioning == "auto":
            conditioning = "modality" if len(self.modalities) > 1 else "none"
        self.conditioning = conditioning
        if conditioning == "none":
            self.classes: list[str] = []
            self.class_index = np.zeros(self.n, dtype=np.int64)
        else:
            if conditioning == "label":
                missing = sum(1 for r in records if r.label is None)
                if missing:
                    raise StoreError(
                        f"cannot condition on label: {missing} train slices have no label"
                    )
                keys = [str(r.label) for r in records]
            else:
                keys = [r.modality for r in records]
            self.classes = sorted(set(keys))
            lookup = {c: i for i, c in enumerate(self.classes)}
            self.class_index = np.array([lookup[k] for k in keys], dtype=np.int64)
        #: Train slices per class: sampling draws classes in these proportions.
        self.class_counts: list[int] = np.bincount(
            self.class_index, minlength=len(self.classes)).tolist() if self.classes else []


def load_training_data(store: Store, conditioning: str) -> tuple[TrainingData, str]:
    """Train split only; refuses an empty store or one of mixed image sizes."""
    try:
        store.image_size()
    except StoreError as exc:
        raise StoreError(f"cannot train: {exc.what}", exc.where) from None
    records = store.records("train")
    if not records:
        raise StoreError("cannot train: the store has no train slices", str(store.root))
    images = store.load(records)
    return TrainingData(images, records, conditioning), store.split_digest("train")


# ---- the run -----------------------------------------------------------------------------


class _Run:
    """State of one training run (both stages), checkpointable at any step boundary."""

    def __init__(
        self, cfg: GeneratorConfig, data: TrainingData, device: torch.device, digest: str
    ) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device
        self.unet_precision = resolve_precision(device, cfg.diffusion_precision)
        self.ae_precision = autoencoder_precision(device)  # encoding the latents
        self.ae_train_precision = resolve_precision(
            device, cfg.ae_train_precision, "generator.ae_train_precision"
        )
        self.digest = digest
        self.step = 0  # global: autoencoder steps then diffusion steps
        self.scale_factor: float | None = None
        self.latents: torch.Tensor | None = None
        self.wall_s = 0.0
        torch.manual_seed(step_seed(cfg.seed, 101))
        self.ae: Any = build_autoencoder(cfg).to(device)
        self.ae_ema = Ema(self.ae, cfg.ema_decay)
        self.ae_opt = torch.optim.AdamW(
            self.ae.parameters(), lr=cfg.ae_lr, weight_decay=cfg.weight_decay,
            fused=device.type == "cuda",
        )
        self.ae_sched = torch.optim.lr_scheduler.LambdaLR(
            self.ae_opt, lr_lambda_for(cfg.ae_steps, cfg.warmup_fraction)
        )
        self.disc: Any = None
        self.disc_opt: torch.optim.Optimizer | None = None
        if cfg.ae_adversarial_weight > 0:
            torch.manual_seed(step_seed(cfg.seed, 102))
            self.disc = build_discriminator(cfg).to(device)
            self.disc_opt = torch.optim.AdamW(
                self.disc.parameters(), lr=cfg.ae_lr, fused=device.type == "cuda"
            )
        torch.manual_seed(step_seed(cfg.seed, 103))
        self.unet: Any = build_unet(cfg, len(data.classes)).to(device)
        self.unet_ema = Ema(self.unet, cfg.ema_decay)
        self.unet_opt = torch.optim.AdamW(
            self.unet.parameters(), lr=cfg.diffusion_lr, weight_decay=cfg.weight_decay,
            fused=device.type == "cuda",
        )
        self.unet_sched = torch.optim.lr_scheduler.LambdaLR(
            self.unet_opt, lr_lambda_for(cfg.diffusion_steps, cfg.warmup_fraction)
        )
        self.noise_sched = make_scheduler(cfg, "train")
        self.alphas_cumprod = self.noise_sched.alphas_cumprod.to(device)

    # -- state ------------------------------------------------------------------------------

    @property
    def stage(self) -> str:
        if self.step < self.cfg.ae_steps:
            return "autoencoder"
        if self.step < self.cfg.total_steps:
            return "diffusion"
        return "done"

    def state(self, run_id: str) -> dict[str, Any]:
        state: dict[str, Any] = {
            "config": self.cfg.to_dict(),
            "stage": self.stage,
            "step": self.step,
            "run_id": run_id,
            "image_size": self.data.size,
            "modalities": self.data.modalities,
            "counts_by_modality": self.data.counts_by_modality,
            "conditioning": self.data.conditioning,
            "classes": self.data.classes,
            "class_counts": self.data.class_counts,
            "train_split_digest": self.digest,
            "train_pixel_digests": self.data.pixel_digests,
            "scale_factor": self.scale_factor,
            "wall_s": self.wall_s,
            "torch_rng": torch.get_rng_state(),
            "ae": self.ae.state_dict(),
            "ae_ema": self.ae_ema.state_dict(),
            "ae_opt": self.ae_opt.state_dict(),
            "ae_sched": self.ae_sched.state_dict(),
            "unet": self.unet.state_dict(),
            "unet_ema": self.unet_ema.state_dict(),
            "unet_opt": self.unet_opt.state_dict(),
            "unet_sched": self.unet_sched.state_dict(),
        }
        if self.disc is not None and self.disc_opt is not None:
            state["disc"] = self.disc.state_dict()
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.wall_s = float(state.get("wall_s", 0.0))
        sf = state.get("scale_factor")
        self.scale_factor = None if sf is None else float(sf)
        self.ae.load_state_dict(state["ae"])
        self.ae_ema.load_state_dict(state["ae_ema"])
        self.ae_opt.load_state_dict(state["ae_opt"])
        self.ae_sched.load_state_dict(state["ae_sched"])
        self.unet.load_state_dict(state["unet"])
        self.unet_ema.load_state_dict(state["unet_ema"])
        self.unet_opt.load_state_dict(state["unet_opt"])
        self.unet_sched.load_state_dict(state["unet_sched"])
        if self.disc is not None and self.disc_opt is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])
        torch.set_rng_state(state["torch_rng"])

    # -- helpers ----------------------------------------------------------------------------

    def _generator(self, stage: int, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(step_seed(self.cfg.seed, stage, step))

    def _batch(self, stage: int, step: int, batch_size: int) -> np.ndarray:
        return batch_indices(self.cfg.seed, stage, step, batch_size, self.data.n)

    def _clip_and_step(
        self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, ema: Ema
    ) -> float:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(model)
        return float(norm)

    # -- stage 1 ----------------------------------------------------------------------------

    def autoencoder_step(self) -> dict[str, float]:
        cfg, k = self.cfg, self.step
        idx = self._batch(0, k, cfg.ae_batch_size)
        g = self._generator(0, k)
        x = torch.from_numpy(self.data.images[idx]).unsqueeze(1).to(self.device)
        eps = torch.randn(
            (len(idx), cfg.ae_latent_channels, *self._latent_hw()), generator=g
        ).to(self.device)
        self.ae.train()
        with autocast(self.device, self.ae_train_precision):
            z_mu, z_sigma = self.ae.encode(x)
            z = z_mu + z_sigma * eps
            recon = self.ae.decode(z)
        recon = recon.float()
        z_mu, z_sigma = z_mu.float(), z_sigma.float()
        l1 = (recon - x).abs().mean()
        kl = 0.5 * torch.sum(
            z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0,
            dim=[1, 2, 3],
        ).mean()
        loss = l1 + cfg.ae_kl_weight * kl
        out = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        adversarial = self.disc is not None and k >= cfg.ae_adversarial_start
        if adversarial and self.disc is not None:
            # Least-squares patch GAN (MONAI PatchDiscriminator: last output is the logits).
            fake_logits = self.disc(recon)[-1]
            g_adv = (fake_logits - 1.0).pow(2).mean()
            loss = loss + cfg.ae_adversarial_weight * g_adv
            out["g_adv"] = float(g_adv.detach())
        self.ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        out["grad_norm"] = self._clip_and_step(self.ae, self.ae_opt, self.ae_sched, self.ae_ema)
        if adversarial and self.disc is not None and self.disc_opt is not None:
            real_logits = self.disc(x)[-1]
            fake_logits = self.disc(recon.detach())[-1]
            d_loss = 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
            self.disc_opt.step()
            out["d_loss"] = float(d_loss.detach())
        out["loss"] = float(loss.detach())
        out["lr"] = float(self.ae_sched.get_last_lr()[0])
        return out

    def _latent_hw(self) -> tuple[int, int]:
        side = self.data.size // self.cfg.latent_downsampling
        return side, side

    # -- between the stages -----------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self) -> None:
        """Latent means of the whole train split (EMA encoder) and the scale factor 1/std."""
        model: Any = self.ae_ema.model.eval()
        chunks = []
        for start in range(0, self.data.n, 64):
            x = torch.from_numpy(self.data.images[start : start + 64]).unsqueeze(1)
            with autocast(self.device, self.ae_precision):
                z_mu, _ = model.encode(x.to(self.device))
            chunks.append(z_mu.float())
        self.latents = torch.cat(chunks)
        if self.scale_factor is None:
            std = float(self.latents.std())
            self.scale_factor = 1.0 / max(std, 1e-6)

    # -- stage 2 ----------------------------------------------------------------------------

    def diffusion_step(self) -> dict[str, float]:
        cfg = self.cfg
        k = self.step - cfg.ae_steps
        if self.latents is None or self.scale_factor is None:
            self.encode_latents()
        assert self.latents is not None and self.scale_factor is not None
        idx = self._batch(1, k, cfg.diffusion_batch_size)
        g = self._generator(1, k)
        z0 = self.latents[torch.from_numpy(idx).to(self.device)] * self.scale_factor
        noise = torch.randn(z0.shape, generator=g).to(self.device)
        t = torch.randint(0, cfg.train_timesteps, (len(idx),), generator=g).to(self.device)
        drop = torch.rand((len(idx),), generator=g).to(self.device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        if cfg.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * z0
        else:
            target = noise
        labels = None
        if self.data.classes:
            labels = torch.from_numpy(self.data.class_index[idx]).to(self.device)
            null = torch.full_like(labels, len(self.data.classes))
            labels = torch.where(drop < cfg.condition_dropout, null, labels)
        self.unet.train()
        with autocast(self.device, self.unet_precision):
            pred = self.unet(zt, t, class_labels=labels)
        sq = (pred.float() - target).pow(2)
        mse = sq.mean()
        if cfg.loss_weighting == "uniform":
            loss = mse  # exactly the loss of checkpoints that predate the weighting
        else:
            loss = (loss_weights(a.view(-1), cfg) * sq.mean(dim=(1, 2, 3))).mean()
        self.unet_opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = self._clip_and_step(self.unet, self.unet_opt, self.unet_sched, self.unet_ema)
        return {"mse": float(mse.detach()), "loss": float(loss.detach()), "grad_norm": norm,
                "lr": float(self.unet_sched.get_last_lr()[0])}


# ---- logs --------------------------------------------------------------------------------


class _RunLog:
    """runs/<run-id>/: train.log (text), losses.jsonl (one line per step)."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.losses = run_dir / "losses.jsonl"
        if resume_step is not None and self.losses.exists():
            # Drop lines past the checkpoint (steps that a kill threw away).
            kept = [
                line for line in self.losses.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] < resume_step
            ]
            atomic_write_text(self.losses, "".join(line + "\n" for line in kept))
        self._losses = open(self.losses, "a", encoding="utf-8")  # noqa: SIM115
        self._text = open(run_dir / "train.log", "a", encoding="utf-8")  # noqa: SIM115

    def say(self, message: str, echo: bool) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {message}"
        self._text.write(line + "\n")
        self._text.flush()
        if echo:
            print(message, file=sys.stderr)

    def loss(self, record: dict[str, Any]) -> None:
        self._losses.write(json.dumps(record, sort_keys=True) + "\n")

    def flush(self) -> None:
        """Put every logged step on disk: called before each checkpoint, so a run killed
        outright (SIGKILL, out of memory) keeps the loss of every step the checkpoint has."""
        self._losses.flush()
        os.fsync(self._losses.fileno())

    def close(self) -> None:
        self._losses.close()
        self._text.close()


def read_losses(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def final_losses(records: list[dict[str, Any]], window: int = 50) -> dict[str, float]:
    """Mean of the last ``window`` logged losses of each stage."""
    out: dict[str, float] = {}
    for stage, key in (("autoencoder", "l1"), ("autoencoder", "kl"), ("diffusion", "mse")):
        values = [r[key] for r in records if r["stage"] == stage and key in r]
        if values:
            out[f"{stage}_{key}"] = float(np.mean(values[-window:]))
    return out


@contextmanager
def _progress(total: int, initial: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(
        total=total, initial=initial, file=sys.stderr, disable=not enabled,
        unit="step", dynamic_ncols=True, desc="train",
    )
    try:
        yield bar
    finally:
        bar.close()


# ---- entry point -------------------------------------------------------------------------


def train_generator(
    paths: NodePaths,
    config: NodeConfig,
    preset: str | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    device: str | None = None,
    quality: bool = True,
) -> dict[str, Any]:
    """Train (or resume) the site generator; returns a summary of the run.

    ``max_steps`` stops after that many global steps (autoencoder + diffusion) without
    changing the schedules, exactly like an interruption: ``resume`` continues from there.
    """
    torch_device = choose_device(device)
    loaded_digest = ""
    ckpt_file = checkpoint_path(paths)
    with Store(paths.store) as store:
        state: dict[str, Any] | None = None
        if resume:
            if not ckpt_file.exists():
                raise TrainingError("nothing to resume: no checkpoint", str(ckpt_file))
            state, loaded_digest = load_checkpoint(ckpt_file)
            cfg = config_from_dict(state["config"])
            data, digest = load_training_data(store, state["conditioning"])
            check_split(state, digest, str(ckpt_file))
        else:
            if ckpt_file.exists() and not overwrite:
                raise TrainingError(
                    "a generator checkpoint exists: pass --resume to continue it or"
                    " --overwrite to train a new one",
                    str(ckpt_file),
                )
            cfg = resolve_config(config.generator, preset)
            data, digest = load_training_data(store, cfg.conditioning)
    if data.size % cfg.latent_downsampling:
        raise TrainingError(
            f"image size {data.size} is not a multiple of the autoencoder's downsampling"
            f" {cfg.latent_downsampling}",
            "generator.ae_channels",
        )
    side = data.size // cfg.latent_downsampling
    unet_factor = cfg.unet_patch * 2 ** (len(cfg.unet_channels) - 1)
    if side % unet_factor:
        raise TrainingError(
            f"latents of {side}x{side} do not fold into patches of {cfg.unet_patch} and halve"
            f" {len(cfg.unet_channels) - 1} times in the UNet (a multiple of {unet_factor})",
            "generator.unet_patch",
        )

    run = _Run(cfg, data, torch_device, digest)
    if state is not None:
        run.restore(state)
        run_id = str(state["run_id"])
    else:
        run_id = "train-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    log = _RunLog(paths.runs / run_id, run.step if state is not None else None)
    echo = progress
    device_line = describe_device(torch_device, run.unet_precision, run.ae_precision,
                                  run.ae_train_precision)
    log.say(
        f"{'resuming' if state else 'training'} generator: preset {cfg.preset}, device "
        f"{device_line}, {data.n} train slices {data.counts_by_modality} at "
        f"{data.size}x{data.size}, conditioning {data.conditioning}, steps "
        f"{cfg.ae_steps} + {cfg.diffusion_steps}, from step {run.step}",
        echo,
    )
    if state is not None:
        log.say("resuming with the checkpoint's own config (node.yaml and --preset are not"
                " re-read)", echo and preset is not None)
    stop_at = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    last_ckpt_digest = loaded_digest if state is not None else ""
    last_ckpt_step = run.step if state is not None else -1
    started = time.monotonic()
    wall_before = run.wall_s

    def checkpoint() -> str:
        log.flush()
        run.wall_s = wall_before + (time.monotonic() - started)
        return save_checkpoint(ckpt_file, run.state(run_id))

    try:
        with _progress(cfg.total_steps, run.step, progress) as bar:
            while run.step < stop_at:
                stage = run.stage
                if stage == "autoencoder":
                    record = run.autoencoder_step()
                else:
                    record = run.diffusion_step()
                log.loss({"stage": stage, "step": run.step, **record})
                run.step += 1
                bar.update(1)
                bar.set_postfix(stage=stage[:4], loss=f"{record['loss']:.4f}", refresh=False)
                boundary = run.step in (cfg.ae_steps, cfg.total_steps)
                if boundary and run.step == cfg.ae_steps:
                    run.encode_latents()
                    log.say(f"autoencoder done; latent scale factor {run.scale_factor:.4f}",
                            echo)
                if boundary or run.step % cfg.checkpoint_every == 0:
                    last_ckpt_digest, last_ckpt_step = checkpoint(), run.step
    except KeyboardInterrupt:
        log.say(f"interrupted at step {run.step}; the last checkpoint is usable (--resume)",
                True)
        log.close()
        raise
    if last_ckpt_step != run.step:
        last_ckpt_digest = checkpoint()
    log.say(f"stopped at step {run.step} of {cfg.total_steps}", echo)
    log.close()

    losses = read_losses(log.losses)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "run_dir": str(log.dir),
        "preset": cfg.preset,
        "device": device_line,
        "precision": {"unet": run.unet_precision, "autoencoder": run.ae_precision,
                      "autoencoder_training": run.ae_train_precision},
        "step": run.step,
        "total_steps": cfg.total_steps,
        "ae_steps": cfg.ae_steps,
        "diffusion_steps": cfg.diffusion_steps,
        "finished": run.step >= cfg.total_steps,
        "resumed": state is not None,
        "wall_s": round(wall_before + (time.monotonic() - started), 2),
        "final_losses": final_losses(losses),
        "checkpoint": str(ckpt_file),
        "checkpoint_digest": last_ckpt_digest,
        "train_split_digest": digest,
        "scale_factor": run.scale_factor,
        "slices": data.n,
        "counts_by_modality": data.counts_by_modality,
        "conditioning": data.conditioning,
    }
    from node.generator.figures import plot_losses

    plot_losses(losses, log.dir / "losses.png")
    if summary["finished"] and quality:
        from node.generator.quality import quality_report
        from node.generator.sampling import load_generator

        generator = load_generator(paths, device=device)
        report = quality_report(paths, generator, cfg.quality_count, seed=cfg.seed,
                                out_dir=log.dir, progress=progress)
        summary["quality"] = report["summary"]
    atomic_write_text(log.dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    append_audit(
        paths.audit,
        "train",
        {
            "preset": cfg.preset,
            "step": run.step,
            "total_steps": cfg.total_steps,
            "finished": summary["finished"],
            "resumed": summary["resumed"],
            "slices": data.n,
            "train_split_digest": digest,
            "checkpoint_digest": last_ckpt_digest,
            "wall_s": summary["wall_s"],
            "device": torch_device.type,
        },
    )
    return summary
