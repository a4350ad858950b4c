"""The networks and noise schedules of the latent diffusion model, built from a config.

Stage 1 is MONAI's ``AutoencoderKL``; stage 2 MONAI's ``DiffusionModelUNet`` on the scaled
latents; the noise schedule of training and of every sampler comes from diffusers schedulers
built by :func:`make_scheduler` from the same config, so they cannot drift apart.
No weights are ever downloaded (ARCHITECTURE invariant 7).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from node.generator.presets import GeneratorConfig

__all__ = ["build_autoencoder", "build_unet", "build_discriminator", "make_scheduler", "Ema",
           "PatchedUNet"]

SamplerName = Literal["dpm", "ddim", "ddpm"]


def build_autoencoder(config: GeneratorConfig) -> nn.Module:
    from monai.networks.nets.autoencoderkl import AutoencoderKL

    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(config.ae_channels),
        latent_channels=config.ae_latent_channels,
        num_res_blocks=config.ae_num_res_blocks,
        attention_levels=(False,) * len(config.ae_channels),
        norm_num_groups=config.ae_norm_groups,
        with_encoder_nonlocal_attn=config.ae_attention,
        with_decoder_nonlocal_attn=config.ae_attention,
    )


class PatchedUNet(nn.Module):
    """A denoiser on ``patch x patch`` blocks of the latents folded into channels
    (``PixelUnshuffle``), unfolded again on the way out: the same latents in and out, at a
    quarter of the positions for ``patch`` 2 (the patch embedding of DiT, without the linear
    layer: the UNet's first convolution is one)."""

    def __init__(self, unet: nn.Module, patch: int) -> None:
        super().__init__()
        self.unet = unet
        self.fold = nn.PixelUnshuffle(patch)
        self.unfold = nn.PixelShuffle(patch)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out: torch.Tensor = self.unfold(self.unet(self.fold(x), timesteps, **kwargs))
        return out


def build_unet(config: GeneratorConfig, n_classes: int) -> nn.Module:
    """The denoiser; with classes it gets one extra embedding, the 'no class' of CFG. With
    ``unet_patch`` > 1 it works on folded patches (:class:`PatchedUNet`); at 1 it is the plain
    MONAI network, whose weights every earlier checkpoint holds."""
    from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet

    folded = config.ae_latent_channels * config.unet_patch**2
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=folded,
        out_channels=folded,
        channels=tuple(config.unet_channels),
        attention_levels=tuple(config.unet_attention_levels),
        num_res_blocks=config.unet_num_res_blocks,
        norm_num_groups=config.unet_norm_groups,
        num_head_channels=config.unet_head_channels,
        num_class_embeds=(n_classes + 1) if n_classes > 0 else None,
    )
    return unet if config.unet_patch == 1 else PatchedUNet(unet, config.unet_patch)


def build_discriminator(config: GeneratorConfig) -> nn.Module:
    from monai.networks.nets.patchgan_discriminator import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=2, num_layers_d=3, channels=32, in_channels=1, out_channels=1
    )


def make_scheduler(config: GeneratorConfig, kind: SamplerName | Literal["train"]) -> Any:
    """A diffusers scheduler with the training beta schedule (same for every sampler)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    ddpm: Any = DDPMScheduler
    ddim: Any = DDIMScheduler
    dpm: Any = DPMSolverMultistepScheduler

    common: dict[str, Any] = {
        "num_train_timesteps": config.train_timesteps,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
    }
    if kind in ("train", "ddpm"):
        return ddpm(**common, clip_sample=False)
    if kind == "ddim":
        return ddim(**common, clip_sample=False, set_alpha_to_one=False,
                             timestep_spacing="trailing")
    if kind == "dpm":
        return dpm(**common, algorithm_type="dpmsolver++",
                                           solver_order=2)
    raise ValueError(f"unknown sampler {kind!r}")


class Ema:
    """Exponential moving average of a module's parameters (with the usual warm-up:
    decay = min(decay, (1 + n) / (10 + n)), so early weights are not frozen in)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA model and model differ in their parameters")
        # One fused multi-tensor kernel instead of one launch per parameter (GPU step time).
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay, "weights": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
        self.model.load_state_dict(state["weights"])
