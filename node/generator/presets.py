"""Presets: complete generator configurations for a CI box, a 2-core CPU and a GPU.

:func:`resolve_config` fills every hyperparameter left ``null`` in node.yaml from the chosen
preset (a command-line ``--preset`` beats node.yaml's), validates the result and returns a
:class:`GeneratorConfig` — the frozen, fully concrete configuration that a checkpoint carries
and that sampling rebuilds the networks from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from node.generator.settings import (
    LOSS_WEIGHTINGS,
    PRECISIONS,
    PRESET_NAMES,
    GeneratorSettings,
)
from protocols.errors import ConfigError

__all__ = ["PRESETS", "GeneratorConfig", "resolve_config", "config_from_dict", "LOSS_WEIGHTINGS"]


#: Keys added after checkpoints were first written, with the value that reproduces how those
#: checkpoints were trained; a checkpoint without them loads with these.
#: Older checkpoints sample with ``diffusion_precision: auto`` like new ones (bf16 where the
#: machine has it natively), although those trained on a CPU were trained in float32.
#: ``ae_train_precision`` only matters when such a run is resumed inside stage 1: ``auto`` is
#: what CUDA always did; on a CPU with native bf16 the rest of stage 1 then runs in bf16.
_LEGACY_DEFAULTS: dict[str, Any] = {"loss_weighting": "uniform", "min_snr_gamma": 5.0,
                                    "diffusion_precision": "auto", "ae_train_precision": "auto",
                                    "unet_patch": 1}

# tiny: seconds on 2 cores at 32x32..64x64 (tests, demo); cpu: ~1 h on 2 cores at 64x64;
# gpu: 128x128 and up with bf16 autocast; on an H100 its UNet steps are launch-bound (10.6
# steps/s at batch 64 on 16x16x4 latents), so the batch is 256 for the same step time. The cpu
# preset's autoencoder downsamples 2x (64x64 -> 32x32x3 latents): a 4x autoencoder (16x16x3)
# lost the ventricles in reconstruction (holdout PSNR 26.1 dB after 3,000 steps; the 2x one
# reaches 26.5 dB after 600), and a latent that has lost them cannot be sampled with them.
# A 4x autoencoder with 8 latent channels (2026-12-07) lets the UNet see 3x the latents in
# the hour (batch 64 at 16x16): more coherent heads, but 3.7-4.1 dB lower holdout PSNR, a
# worse sample spectrum and no clearer ventricles (bench/RESULTS.md); not adopted.
# Step times on the idle 2-core box (2 threads): about 0.3 s per autoencoder step (batch 16),
# 0.42 s per UNet step (batch 32 at 32x32; channels 32/64/128, attention only at 8x8), so
# 3,000 + 6,000 steps is about an hour.
# Those are float32 times. With ``diffusion_precision: auto`` the UNet runs in bf16 autocast on
# a CPU with native bf16 (AVX512-BF16 or AMX): on the AMD EPYC box a UNet step took 0.28 s
# instead of 0.47-0.50 s (2026-12-06). ``ae_train_precision: auto`` does the same for the
# autoencoder's training steps (0.22 s instead of 0.39 s there), and the cpu preset spends
# that on twice the autoencoder steps: 6,000 bf16 steps reconstruct holdout slices at 32.73 dB
# against 31.96 dB after 3,000 float32 ones (6,000 float32 steps: 32.70 dB), and the whole
# run took 58 min on 2,411 MR slices (2026-12-07, bench/RESULTS.md). On a CPU without native
# bf16 both stages run in float32: about 80 minutes by the float32 step times above (not run).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "ae_channels": [8, 16, 16],
        "ae_latent_channels": 2,
        "ae_num_res_blocks": 1,
        "ae_norm_groups": 4,
        "ae_attention": False,
        "ae_steps": 60,
        "ae_batch_size": 16,
        "ae_lr": 3e-3,
        "ae_kl_weight": 1e-6,
        "ae_adversarial_weight": 0.0,
        "ae_adversarial_start": 0,
        "ae_train_precision": "auto",
        "unet_channels": [16, 32],
        "unet_attention_levels": [False, False],
        "unet_num_res_blocks": 1,
        "unet_norm_groups": 8,
        "unet_head_channels": 8,
        "unet_patch": 1,
        "diffusion_steps": 80,
        "diffusion_batch_size": 16,
        "diffusion_lr": 2e-3,
        "prediction_type": "epsilon",
        "loss_weighting": "uniform",
        "min_snr_gamma": 5.0,
        "diffusion_precision": "auto",
        "train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "conditioning": "auto",
        "condition_dropout": 0.1,
        "guidance_scale": 1.0,
        "ema_decay": 0.99,
        "warmup_fraction": 0.05,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "checkpoint_every": 50,
        "sampler": "dpm",
        "sample_steps": 10,
        "quality_count": 32,
    },
    "cpu": {
        "ae_channels": [32, 64],
        "ae_latent_channels": 3,
        "ae_num_res_blocks": 1,
        "ae_norm_groups": 16,
        "ae_attention": False,
        "ae_steps": 6000,
        "ae_batch_size": 16,
        "ae_lr": 1e-3,
        "ae_kl_weight": 1e-6,
        "ae_adversarial_weight": 0.0,
        "ae_adversarial_start": 1000,
        "ae_train_precision": "auto",
        "unet_channels": [32, 64, 128],
        "unet_attention_levels": [False, False, True],
        "unet_num_res_blocks": 1,
        "unet_norm_groups": 16,
        "unet_head_channels": 32,
        "unet_patch": 1,
        "diffusion_steps": 6000,
        "diffusion_batch_size": 32,
        "diffusion_lr": 5e-4,
        "prediction_type": "v_prediction",
        "loss_weighting": "uniform",
        "min_snr_gamma": 5.0,
        "diffusion_precision": "auto",
        "train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "conditioning": "auto",
        "condition_dropout": 0.1,
        "guidance_scale": 1.0,
        "ema_decay": 0.999,
        "warmup_fraction": 0.02,
        "weight_decay": 1e-4,
        "grad_clip": 1.0,
        "checkpoint_every": 250,
        "sampler": "dpm",
        "sample_steps": 20,
        "quality_count": 256,
    },
    "gpu": {
        "ae_channels": [64, 128, 128, 256],
        "ae_latent_channels": 4,
        "ae_num_res_blocks": 2,
        "ae_norm_groups": 32,
        "ae_attention": True,
        "ae_steps": 20000,
        "ae_batch_size": 32,
        "ae_lr": 5e-4,
        "ae_kl_weight": 1e-6,
        "ae_adversarial_weight": 0.01,
        "ae_adversarial_start": 5000,
        "ae_train_precision": "auto",
        "unet_channels": [128, 256, 384],
        "unet_attention_levels": [False, True, True],
        "unet_num_res_blocks": 2,
        "unet_norm_groups": 32,
        "unet_head_channels": 64,
        "unet_patch": 1,
        "diffusion_steps": 60000,
        "diffusion_batch_size": 256,
        "diffusion_lr": 3e-4,
        "prediction_type": "v_prediction",
        "loss_weighting": "uniform",
        "min_snr_gamma": 5.0,
        "diffusion_precision": "auto",
        "train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.0015,
        "beta_end": 0.0195,
        "conditioning": "auto",
        "condition_dropout": 0.1,
        "guidance_scale": 1.5,
        "ema_decay": 0.9999,
        "warmup_fraction": 0.01,
        "weight_decay": 1e-4,
        "grad_clip": 1.0,
        "checkpoint_every": 1000,
        "sampler": "dpm",
        "sample_steps": 20,
        "quality_count": 1000,
    },
}


@dataclass(frozen=True)
class GeneratorConfig:
    """The concrete configuration of one generator: what a checkpoint records."""

    preset: str
    seed: int
    ae_channels: tuple[int, ...]
    ae_latent_channels: int
    ae_num_res_blocks: int
    ae_norm_groups: int
    ae_attention: bool
    ae_steps: int
    ae_batch_size: int
    ae_lr: float
    ae_kl_weight: float
    ae_adversarial_weight: float
    ae_adversarial_start: int
    unet_channels: tuple[int, ...]
    unet_attention_levels: tuple[bool, ...]
    unet_num_res_blocks: int
    unet_norm_groups: int
    unet_head_channels: int
    unet_patch: int
    diffusion_steps: int
    diffusion_batch_size: int
    diffusion_lr: float
    prediction_type: str
    loss_weighting: str
    min_snr_gamma: float
    diffusion_precision: str
    ae_train_precision: str
    train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    conditioning: str
    condition_dropout: float
    guidance_scale: float
    ema_decay: float
    warmup_fraction: float
    weight_decay: float
    grad_clip: float
    checkpoint_every: int
    sampler: str
    sample_steps: int
    quality_count: int

    @property
    def total_steps(self) -> int:
        return self.ae_steps + self.diffusion_steps

    @property
    def latent_downsampling(self) -> int:
        return int(2 ** (len(self.ae_channels) - 1))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def check(self, where: str = "generator") -> None:
        """Reject combinations the networks cannot build, naming the key."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"generator.{key}: {why}", where)

        for key in ("ae_channels", "unet_channels"):
            chans = getattr(self, key)
            groups = self.ae_norm_groups if key == "ae_channels" else self.unet_norm_groups
            if not chans or any(c <= 0 for c in chans):
                raise bad(key, "must be a non-empty list of positive integers")
            if any(c % groups for c in chans):
                raise bad(key, f"every channel count must be a multiple of norm groups {groups}")
        if len(self.unet_attention_levels) != len(self.unet_channels):
            raise bad("unet_attention_levels", "needs one entry per unet_channels level")
        for key, chans, flags in (("unet_head_channels", self.unet_channels,
                                   self.unet_attention_levels),):
            for c, flag in zip(chans, flags, strict=True):
                if flag and c % self.unet_head_channels:
                    raise bad(key, f"must divide every attention level's channels ({c})")
        for key in ("ae_steps", "diffusion_steps", "ae_batch_size", "diffusion_batch_size",
                    "train_timesteps", "checkpoint_every", "sample_steps", "quality_count",
                    "ae_latent_channels", "ae_num_res_blocks", "unet_num_res_blocks",
                    "unet_patch"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be positive")
        for key in ("ae_lr", "diffusion_lr", "grad_clip"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be positive")
        for key in ("condition_dropout", "ema_decay", "warmup_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must be in [0, 1)")
        if self.guidance_scale < 0:
            raise bad("guidance_scale", "must be >= 0")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise bad("loss_weighting", f"must be one of {', '.join(LOSS_WEIGHTINGS)}")
        for key in ("diffusion_precision", "ae_train_precision"):
            if getattr(self, key) not in PRECISIONS:
                raise bad(key, f"must be one of {', '.join(PRECISIONS)}")
        if not self.min_snr_gamma > 0:
            raise bad("min_snr_gamma", "must be positive")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise bad("beta_end", "needs 0 < beta_start < beta_end < 1")
        if self.sample_steps > self.train_timesteps:
            raise bad("sample_steps", "cannot exceed train_timesteps")


def resolve_config(settings: GeneratorSettings, preset: str | None = None) -> GeneratorConfig:
    """node.yaml's generator section, with every ``null`` filled from the preset."""
    name = preset if preset is not None else settings.preset
    if name not in PRESETS:
        allowed = ", ".join(PRESET_NAMES)
        raise ConfigError(f"unknown preset {name!r}; choose one of {allowed}", "--preset")
    values: dict[str, Any] = {"preset": name, "seed": settings.seed}
    for key, default in PRESETS[name].items():
        given = getattr(settings, key)
        values[key] = default if given is None else given
    for key in ("ae_channels", "unet_channels", "unet_attention_levels"):
        values[key] = tuple(values[key])
    config = GeneratorConfig(**values)
    config.check()
    return config


def config_from_dict(data: dict[str, Any]) -> GeneratorConfig:
    """Rebuild the configuration a checkpoint recorded."""
    names = {f.name for f in dataclasses.fields(GeneratorConfig)}
    data = {**{k: v for k, v in _LEGACY_DEFAULTS.items() if k not in data}, **data}
    unknown = set(data) - names
    missing = names - set(data)
    if unknown or missing:
        raise ConfigError(
            f"checkpoint config does not match this version (unknown {sorted(unknown)},"
            f" missing {sorted(missing)})",
            "checkpoint",
        )
    values = dict(data)
    for key in ("ae_channels", "unet_channels", "unet_attention_levels"):
        values[key] = tuple(values[key])
    return GeneratorConfig(**values)
