"""Sampling the trained site generator (contract A): the library API the guard calls.

``load_generator(paths)`` rebuilds the networks from the checkpoint's recorded config and its
EMA weights; ``Generator.sample`` draws images with a diffusers scheduler built on the training
beta schedule (DPM-Solver++ multistep by default, DDIM, or ancestral DDPM). Same seed, same
machine: same images — the initial noise of image i is drawn from a generator seeded by
(seed, i), so it does not depend on the batch size; DDPM's per-step noise comes from a
generator seeded by (seed, batch). A label-conditioned generator asked for no label draws
each image's class from the train split's class proportions, seeded by (seed, i), and applies
classifier-free guidance to it. Images come back in the store's normalised space;
:func:`to_physical` maps them to physical units (HU for CT).

What this module must never do: write anything into the outbox. Samples are unscreened; only
the guard's in-memory accepted set may become an export.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from node.config import NodePaths
from node.errors import TrainingError
from node.generator.checkpoint import checkpoint_path, load_checkpoint
from node.generator.device import (
    autocast,
    autoencoder_precision,
    choose_device,
    resolve_precision,
)
from node.generator.networks import build_autoencoder, build_unet, make_scheduler
from node.generator.presets import GeneratorConfig, config_from_dict
from node.generator.train import step_seed
from node.store import Store
from protocols.errors import UsageError
from protocols.files import atomic_write_bytes, atomic_write_text

__all__ = ["Generator", "load_generator", "to_physical", "write_unscreened_samples"]

SamplerName = Literal["dpm", "ddim", "ddpm"]
_NOISE_STREAM = 7001
_STEP_STREAM = 7002
_LABEL_STREAM = 7003


class Generator:
    """A trained generator, ready to sample (EMA weights, eval mode, no gradients)."""

    def __init__(self, state: dict[str, Any], checkpoint_digest: str, device: torch.device):
        if state.get("stage") != "done":
            raise TrainingError(
                f"no trained generator: the checkpoint is unfinished (stage"
                f" {state.get('stage')}, step {state.get('step')}); run synthfed-node train"
                " --resume",
                "models/generator.pt",
            )
        self.config: GeneratorConfig = config_from_dict(state["config"])
        self.device = device
        # Resolved on the machine that samples, which need not be the one that trained.
        self.unet_precision = resolve_precision(device, self.config.diffusion_precision)
        self.ae_precision = autoencoder_precision(device)
        self.image_size: int = int(state["image_size"])
        self.modalities: list[str] = list(state["modalities"])
        self.counts_by_modality: dict[str, int] = dict(state["counts_by_modality"])
        self.conditioning: str = str(state["conditioning"])
        self.classes: list[str] = list(state["classes"])
        # Checkpoints written before the counts were kept sample 'no label' unconditionally.
        self.class_counts: list[int] = [int(c) for c in state.get("class_counts", [])]
        self.checkpoint_digest = checkpoint_digest
        self.train_split_digest: str = str(state["train_split_digest"])
        # The pixel digests of the slices it learnt from (None: a checkpoint from before they
        # were kept, known by its split digest only).
        digests = state.get("train_pixel_digests")
        self.train_pixel_digests: frozenset[str] | None = (
            frozenset(str(d) for d in digests) if digests is not None else None
        )
        self.scale_factor = float(state["scale_factor"])
        self.steps_trained = int(state["step"])
        self.autoencoder: Any = build_autoencoder(self.config)
        self.autoencoder.load_state_dict(state["ae_ema"]["weights"])
        self.unet: Any = build_unet(self.config, len(self.classes))
        self.unet.load_state_dict(state["unet_ema"]["weights"])
        for model in (self.autoencoder, self.unet):
            model.to(device).eval()
            for p in model.parameters():
                p.requires_grad_(False)

    # ---- description ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What the manifest may say about the generator (nothing per patient)."""
        cfg = self.config
        return {
            "architecture": {
                "stage1": {
                    "network": "monai.networks.nets.AutoencoderKL",
                    "channels": list(cfg.ae_channels),
                    "latent_channels": cfg.ae_latent_channels,
                    "num_res_blocks": cfg.ae_num_res_blocks,
                },
                "stage2": {
                    "network": "monai.networks.nets.DiffusionModelUNet",
                    "channels": list(cfg.unet_channels),
                    "attention_levels": list(cfg.unet_attention_levels),
                    "num_res_blocks": cfg.unet_num_res_blocks,
                    "patch": cfg.unet_patch,
                    "prediction_type": cfg.prediction_type,
                },
                "schedule": {
                    "train_timesteps": cfg.train_timesteps,
                    "beta_schedule": cfg.beta_schedule,
                    "beta_start": cfg.beta_start,
                    "beta_end": cfg.beta_end,
                },
                "latent_scale_factor": self.scale_factor,
                "conditioning": self.conditioning,
                "classes": self.classes,
            },
            "checkpoint_digest": self.checkpoint_digest,
            "train_split_digest": self.train_split_digest,
            "counts_by_modality": self.counts_by_modality,
            "image_size": self.image_size,
            "preset": cfg.preset,
            "steps": self.steps_trained,
            "ae_steps": cfg.ae_steps,
            "diffusion_steps": cfg.diffusion_steps,
            # How these images were sampled (resolved on this machine): bf16 and float32
            # sampling from the same seed give slightly different images.
            "sampling_precision": {"unet": self.unet_precision,
                                   "autoencoder": self.ae_precision},
        }

    # ---- sampling ---------------------------------------------------------------------------

    def _class_index(self, modality: str | None, label: str | None) -> int | None:
        """The class to condition on; None for an unconditional model; len(classes) = 'none'."""
        if modality is not None and modality not in self.modalities:
            raise UsageError(
                f"this generator was trained on {', '.join(self.modalities)}, not {modality}",
                "modality",
            )
        if self.conditioning == "none":
            if label is not None:
                raise UsageError("this generator is not label-conditioned", "label")
            return None
        if self.conditioning == "modality":
            if modality is None:
                if len(self.classes) == 1:
                    return 0
                raise UsageError(
                    f"this generator knows several modalities ({', '.join(self.classes)}):"
                    " pass modality",
                    "modality",
                )
            return self.classes.index(modality)
        if label is None:
            return len(self.classes)
        if label not in self.classes:
            raise UsageError(f"unknown label {label!r}; known: {', '.join(self.classes)}",
                             "label")
        return self.classes.index(label)

    def _image_classes(self, cls: int | None, seed: int, first: int, n: int
                       ) -> np.ndarray | None:
        """Per image, the class index of images ``first .. first + n``; None: unconditional.

        A label-conditioned generator asked for no label (``cls`` is the null class) draws each
        image's class from the train proportions, seeded by (seed, i) like its noise."""
        if cls is None:
            return None
        if cls == len(self.classes) and self.conditioning == "label" and sum(self.class_counts) > 0:
            p = np.asarray(self.class_counts, dtype=np.float64)
            p /= p.sum()
            return np.array([
                np.random.default_rng(step_seed(seed, _LABEL_STREAM, first + i)).choice(
                    len(p), p=p)
                for i in range(n)
            ], dtype=np.int64)
        return np.full(n, cls, dtype=np.int64)

    def _predict(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                 guided: bool) -> Any:
        """The UNet's prediction; ``labels`` per image (None: unconditional), ``guided``:
        classifier-free guidance applies (decided once per batch by :meth:`_batch_labels`)."""
        timesteps = t.expand(z.shape[0]).to(self.device)
        with autocast(self.device, self.unet_precision):
            if labels is None:
                return self.unet(z, timesteps).float()
            if not guided:
                return self.unet(z, timesteps, class_labels=labels).float()
            # Classifier-free guidance: one batched pass with and without the class (an image
            # of the null class gets uncond + g * 0).
            n = z.shape[0]
            null = torch.full_like(labels, len(self.classes))
            out = self.unet(torch.cat([z, z]), torch.cat([timesteps, timesteps]),
                            class_labels=torch.cat([labels, null])).float()
            cond, uncond = out[:n], out[n:]
            return uncond + self.config.guidance_scale * (cond - uncond)

    def _batch_labels(self, classes: np.ndarray | None) -> tuple[torch.Tensor | None, bool]:
        """A batch's class indices as a tensor on the device, and whether guidance applies."""
        if classes is None:
            return None, False
        guided = self.config.guidance_scale != 1.0 and not bool(
            np.all(classes == len(self.classes)))
        return torch.from_numpy(classes).to(self.device), guided

    @torch.no_grad()
    def sample(
        self,
        count: int,
        seed: int,
        scheduler: SamplerName = "dpm",
        steps: int | None = None,
        batch_size: int = 16,
        modality: str | None = None,
        progress: bool = False,
        *,
        label: str | None = None,
    ) -> np.ndarray:
        """``count`` images, float32 [count, S, S] in the store's normalised space [0, 1]."""
        if count < 0 or batch_size < 1:
            raise UsageError("count must be >= 0 and batch_size >= 1", "sample")
        if scheduler not in ("dpm", "ddim", "ddpm"):
            raise UsageError(f"unknown scheduler {scheduler!r}; use dpm, ddim or ddpm",
                             "scheduler")
        cfg = self.config
        if steps is None:
            steps = cfg.train_timesteps if scheduler == "ddpm" else cfg.sample_steps
        if not 1 <= steps <= cfg.train_timesteps:
            raise UsageError(f"steps must be in 1..{cfg.train_timesteps}", "steps")
        cls = self._class_index(modality, label)
        side = self.image_size // cfg.latent_downsampling
        shape = (cfg.ae_latent_channels, side, side)
        out = np.empty((count, self.image_size, self.image_size), dtype=np.float32)
        from tqdm import tqdm

        batches = range(0, count, batch_size)
        for b, start in enumerate(tqdm(batches, file=sys.stderr, disable=not progress,
                                       desc=f"sample ({scheduler} {steps})", unit="batch")):
            n = min(batch_size, count - start)
            noise = torch.stack([
                torch.randn(shape, generator=torch.Generator().manual_seed(
                    step_seed(seed, _NOISE_STREAM, start + i)))
                for i in range(n)
            ])
            labels, guided = self._batch_labels(self._image_classes(cls, seed, start, n))
            step_gen = torch.Generator().manual_seed(step_seed(seed, _STEP_STREAM, b))
            sched = make_scheduler(cfg, scheduler)
            sched.set_timesteps(steps)
            z = (noise * sched.init_noise_sigma).to(self.device)
            for t in sched.timesteps:
                model_in = sched.scale_model_input(z, t)
                pred = self._predict(model_in, t.reshape(1), labels, guided)
                if scheduler == "ddpm":
                    z = sched.step(pred.cpu(), t, z.cpu(), generator=step_gen).prev_sample
                    z = z.to(self.device)
                else:
                    z = sched.step(pred, t, z).prev_sample
            with autocast(self.device, self.ae_precision):
                images = self.autoencoder.decode(z / self.scale_factor).float()
            out[start : start + n] = images.clamp(0.0, 1.0)[:, 0].cpu().numpy()
        return out

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Normalised images through the EMA autoencoder (latent mean), clipped to [0, 1]:
        what stage 1 alone keeps of them (a diagnostic; never screened, never exported)."""
        chunks = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size],
                                                      dtype=np.float32))
            with autocast(self.device, self.ae_precision):
                rec = self.autoencoder.reconstruct(x.unsqueeze(1).to(self.device))
            chunks.append(rec.float().clamp(0.0, 1.0)[:, 0].cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, *images.shape[1:]), np.float32)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Site-trained feature space for precision / recall: the EMA encoder's latent means,
        average-pooled to 4x4 per channel and flattened."""
        chunks = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size],
                                                      dtype=np.float32))
            with autocast(self.device, self.ae_precision):
                z_mu, _ = self.autoencoder.encode(x.unsqueeze(1).to(self.device))
            pooled = torch.nn.functional.adaptive_avg_pool2d(z_mu.float(), 4)
            chunks.append(pooled.flatten(1).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.config.ae_latent_channels * 16), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32)


def load_generator(paths: NodePaths, device: str | None = None) -> Generator:
    """The trained generator of a node home; TrainingError when none exists."""
    state, digest = load_checkpoint(checkpoint_path(paths))
    return Generator(state, digest, choose_device(device))


def to_physical(
    paths: NodePaths, images: np.ndarray, modality: str
) -> tuple[np.ndarray, str]:
    """Normalised images -> physical units (HU for CT) with the store's train mapping."""
    with Store(paths.store) as store:
        scale, offset, unit = store.physical_mapping(modality)
    return (images * np.float32(scale) + np.float32(offset)).astype(np.float32), unit


UNSCREENED_NOTE = (
    "UNSCREENED synthetic images from synthfed-node sample: not checked by the distance guard."
    " For inspection only; they may resemble a real patient and must not leave the site."
    " No export can be made from these files: export only takes the guard's in-memory"
    " accepted set.\n"
)


def write_unscreened_samples(
    paths: NodePaths,
    generator: Generator,
    out: Path,
    *,
    count: int,
    seed: int = 0,
    scheduler: str = "dpm",
    steps: int | None = None,
    modality: str | None = None,
    progress: bool = False,
    label: str | None = None,
) -> dict[str, Any]:
    """samples.npz (physical units, flagged unscreened) + samples.png + UNSCREENED.txt."""
    from node.generator.figures import save_grid_png

    target = Path(out).resolve()
    outbox = paths.outbox.resolve()
    if target == outbox or target.is_relative_to(outbox):
        raise UsageError(
            "refusing to write unscreened samples inside the outbox", str(target)
        )
    if count < 1:
        raise UsageError("--count must be at least 1", "--count")
    if modality is None and len(generator.modalities) == 1:
        modality = generator.modalities[0]
    if modality is None:
        raise UsageError(
            f"this generator knows several modalities ({', '.join(generator.modalities)}):"
            " pass --modality",
            "--modality",
        )
    if scheduler not in ("dpm", "ddim", "ddpm"):
        raise UsageError(f"unknown scheduler {scheduler!r}; use dpm, ddim or ddpm",
                         "--scheduler")
    images = generator.sample(count, seed=seed, scheduler=scheduler,  # type: ignore[arg-type]
                              steps=steps, modality=modality, progress=progress,
                              label=label)
    physical, unit = to_physical(paths, images, modality)
    target.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        images=physical,
        unscreened=np.array(True),
        note=np.array(UNSCREENED_NOTE.strip()),
        modality=np.array(modality),
        unit=np.array(unit),
        seed=np.array(seed),
        label=np.array(label if label is not None else ""),
        checkpoint_digest=np.array(generator.checkpoint_digest),
    )
    atomic_write_bytes(target / "samples.npz", buffer.getvalue())
    atomic_write_text(target / "UNSCREENED.txt", UNSCREENED_NOTE)
    low, high = np.percentile(physical, [0.5, 99.5]) if physical.size else (0.0, 1.0)
    save_grid_png(target / "samples.png", physical[:64],
                  f"UNSCREENED {modality} samples ({unit}), seed {seed}",
                  (float(low), float(high)))
    return {
        "count": count,
        "modality": modality,
        "unit": unit,
        "seed": seed,
        "scheduler": scheduler,
        "label": label,
        "unscreened": True,
        "npz": str(target / "samples.npz"),
        "png": str(target / "samples.png"),
        "checkpoint_digest": generator.checkpoint_digest,
    }
