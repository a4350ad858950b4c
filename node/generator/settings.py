"""Generator hyperparameters as they appear in node.yaml (section ``generator``).

Every hyperparameter defaults to ``null``, which means "take the value of the preset"
(``node.generator.presets``); a value written in node.yaml wins over the preset. The resolved,
fully concrete configuration is what a checkpoint records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from protocols.typed import setting

__all__ = ["GeneratorSettings", "PresetName", "PRESET_NAMES", "PrecisionSetting", "PRECISIONS",
           "LossWeighting", "LOSS_WEIGHTINGS"]

PresetName = Literal["tiny", "cpu", "gpu"]
PRESET_NAMES: tuple[str, ...] = ("tiny", "cpu", "gpu")
#: ``diffusion_precision`` values; ``auto`` resolves per machine (node.generator.device).
PrecisionSetting = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionSetting)
LossWeighting = Literal["uniform", "min_snr"]
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)

_P = " (null: from the preset)"


@dataclass
class GeneratorSettings:
    preset: PresetName = setting(
        "cpu", "tiny: CI/demo (<3 min on 2 cores); cpu: ~1 h on 2 cores at 64x64; gpu: 128x128+"
    )
    seed: int = setting(0, "seed of data order, initial weights and sampling")

    # ---- stage 1: AutoencoderKL -------------------------------------------------------------
    ae_channels: list[int] | None = setting(
        None, "autoencoder channels per level; each level after the first halves the size" + _P
    )
    ae_latent_channels: int | None = setting(None, "channels of the latent image" + _P)
    ae_num_res_blocks: int | None = setting(None, "residual blocks per autoencoder level" + _P)
    ae_norm_groups: int | None = setting(None, "GroupNorm groups (divide every channel)" + _P)
    ae_attention: bool | None = setting(
        None, "non-local attention in the autoencoder's middle blocks" + _P
    )
    ae_steps: int | None = setting(None, "optimiser steps of stage 1" + _P)
    ae_batch_size: int | None = setting(None, "stage 1 batch size" + _P)
    ae_lr: float | None = setting(None, "stage 1 peak learning rate (AdamW)" + _P)
    ae_kl_weight: float | None = setting(None, "weight of the KL term beside the L1 loss" + _P)
    ae_adversarial_weight: float | None = setting(
        None, "weight of the MONAI PatchDiscriminator loss; 0 turns it off" + _P
    )
    ae_adversarial_start: int | None = setting(
        None, "stage 1 step at which the adversarial loss starts" + _P
    )
    ae_train_precision: PrecisionSetting | None = setting(
        None,
        "autoencoder arithmetic in its training steps: bfloat16 autocast, float32, or auto (as\n"
        "diffusion_precision); on CPU it encodes the train split and decodes samples in float32\n"
        "whatever this says" + _P,
    )

    # ---- stage 2: DiffusionModelUNet on scaled latents ---------------------------------------
    unet_channels: list[int] | None = setting(None, "diffusion UNet channels per level" + _P)
    unet_attention_levels: list[bool] | None = setting(
        None, "self-attention per UNet level (same length as unet_channels)" + _P
    )
    unet_num_res_blocks: int | None = setting(None, "residual blocks per UNet level" + _P)
    unet_norm_groups: int | None = setting(None, "GroupNorm groups of the UNet" + _P)
    unet_head_channels: int | None = setting(None, "channels per attention head" + _P)
    unet_patch: int | None = setting(
        None,
        "side of the latent patches the UNet works on: 2 folds each 2x2 block of latents into\n"
        "channels (a quarter of the positions, so a cheaper step); 1: every latent position"
        + _P,
    )
    diffusion_steps: int | None = setting(None, "optimiser steps of stage 2" + _P)
    diffusion_batch_size: int | None = setting(None, "stage 2 batch size" + _P)
    diffusion_lr: float | None = setting(None, "stage 2 peak learning rate (AdamW)" + _P)
    prediction_type: Literal["epsilon", "v_prediction"] | None = setting(
        None, "what the UNet predicts: the noise (epsilon) or the velocity (v_prediction)" + _P
    )
    loss_weighting: LossWeighting | None = setting(
        None,
        "stage 2 loss weight per timestep: uniform, or min_snr (Hang et al. 2023,\n"
        "arXiv 2303.09556: min(SNR, gamma) over the objective's own SNR weight)" + _P,
    )
    min_snr_gamma: float | None = setting(None, "gamma of the min_snr loss weighting" + _P)
    diffusion_precision: PrecisionSetting | None = setting(
        None,
        "UNet arithmetic in training and sampling: bfloat16 autocast, float32, or auto (bf16 on\n"
        "CUDA and on CPUs with native bf16, AVX512-BF16 or AMX; float32 elsewhere)" + _P,
    )
    train_timesteps: int | None = setting(None, "diffusion timesteps of the DDPM process" + _P)
    beta_schedule: Literal["linear", "scaled_linear"] | None = setting(
        None, "noise schedule, shared by training and every sampler" + _P
    )
    beta_start: float | None = setting(None, "first beta of the schedule" + _P)
    beta_end: float | None = setting(None, "last beta of the schedule" + _P)
    conditioning: Literal["auto", "none", "modality", "label"] | None = setting(
        None,
        "class conditioning: none, modality, the store's label column, or auto (modality when"
        " the store holds several)" + _P,
    )
    condition_dropout: float | None = setting(
        None, "probability of dropping the class during training (classifier-free guidance)" + _P
    )
    guidance_scale: float | None = setting(
        None, "classifier-free guidance scale at sampling (1: plain conditional)" + _P
    )

    # ---- shared optimisation ---------------------------------------------------------------
    ema_decay: float | None = setting(None, "EMA decay of the weights used for sampling" + _P)
    warmup_fraction: float | None = setting(
        None, "fraction of each stage's steps spent in linear LR warm-up (then cosine)" + _P
    )
    weight_decay: float | None = setting(None, "AdamW weight decay" + _P)
    grad_clip: float | None = setting(None, "gradient norm clip" + _P)
    checkpoint_every: int | None = setting(None, "steps between checkpoints" + _P)

    # ---- sampling and report ---------------------------------------------------------------
    sampler: Literal["dpm", "ddim", "ddpm"] | None = setting(
        None, "default sampler: DPM-Solver++ multistep, DDIM or ancestral DDPM" + _P
    )
    sample_steps: int | None = setting(None, "default sampler steps (DDPM always uses all)" + _P)
    quality_count: int | None = setting(
        None, "synthetic images drawn for the quality report at the end of training" + _P
    )
