"""Restoration networks: two denoisers (RED-CNN, DnCNN-style) and two SR nets (SRCNN, EDSR-style).

Each network's config *is* its typed constructor (keyword arguments of plain types), validated at
once with a specific ``ValueError``; ``net.config`` returns the arguments, so a model file holds
the name + config + state_dict and :func:`build_network` rebuilds it without pickling objects.

All four map a single-channel image on the full grid to an image on the same grid, in the
normalised intensity space of :mod:`coordinator.restore.train`. SR nets therefore take the
cubic-upsampled low-resolution image (SRCNN as in Dong et al. 2014; the EDSR-style net keeps
EDSR's residual body and global skip but no sub-pixel upsampler).

- RED-CNN: Chen et al., IEEE TMI 36 (2017): conv encoder / deconv decoder without padding,
  residual shortcuts every two layers, ReLU, global input shortcut.
- DnCNN: Zhang et al., IEEE TIP 26 (2017): conv-BN-ReLU body predicting the noise (residual).
- EDSR: Lim et al., CVPRW 2017: residual blocks without batch norm, residual scaling.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["REDCNN", "DnCNN", "SRCNN", "EDSR", "NETWORKS", "build_network", "default_net"]


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_odd_kernel(name: str, value: int) -> None:
    _check_positive(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd so the output keeps the input grid, got {value}")


class REDCNN(nn.Module):
    """Residual encoder-decoder CNN (RED-CNN)."""

    def __init__(
        self, in_channels: int = 1, features: int = 96, kernel_size: int = 5, num_layers: int = 5
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("features", features)
        _check_odd_kernel("kernel_size", kernel_size)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or (
            num_layers < 3 or num_layers % 2 == 0
        ):
            # The paper's shortcut pattern (every two layers, mirrored, plus the input) needs an
            # odd number of conv layers; 5 as in the paper.
            raise ValueError(f"num_layers must be an odd integer >= 3, got {num_layers!r}")
        self._config = {
            "in_channels": in_channels, "features": features,
            "kernel_size": kernel_size, "num_layers": num_layers,
        }
        k = kernel_size
        self.encoder = nn.ModuleList(
            [nn.Conv2d(in_channels if i == 0 else features, features, k) for i in range(num_layers)]
        )
        self.decoder = nn.ModuleList(
            [
                nn.ConvTranspose2d(features, in_channels if i == num_layers - 1 else features, k)
                for i in range(num_layers)
            ]
        )
        self.relu = nn.ReLU()

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.encoder)
        skips: list[torch.Tensor] = []
        h = x
        for i, conv in enumerate(self.encoder):
            # the outputs of encoder layers 2, 4, ... feed the mirrored shortcuts
            if i > 0 and i % 2 == 0:
                skips.append(h)
            h = self.relu(conv(h))
        for i, deconv in enumerate(self.decoder):
            h = deconv(h)
            if i < n - 1:
                j = n - 1 - i  # the encoder layer whose input this output matches in shape
                if j > 0 and j % 2 == 0:
                    h = h + skips.pop()
                h = self.relu(h)
        out: torch.Tensor = self.relu(h + x)
        return out


class DnCNN(nn.Module):
    """DnCNN-style residual denoiser: predicts the noise and subtracts it."""

    def __init__(
        self, in_channels: int = 1, features: int = 64, depth: int = 17, batch_norm: bool = True
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("features", features)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 3:
            raise ValueError(f"depth must be an integer >= 3 (first, body, last), got {depth!r}")
        self._config = {
            "in_channels": in_channels, "features": features,
            "depth": depth, "batch_norm": bool(batch_norm),
        }
        layers: list[nn.Module] = [nn.Conv2d(in_channels, features, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(features, features, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(features))
            layers.append(nn.ReLU())
        layers.append(nn.Conv2d(features, in_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x - self.body(x)
        return out


class SRCNN(nn.Module):
    """SRCNN on the cubic-upsampled image (patch extraction, mapping, reconstruction)."""

    def __init__(
        self,
        in_channels: int = 1,
        features: tuple[int, int] | list[int] = (64, 32),
        kernel_sizes: tuple[int, int, int] | list[int] = (9, 5, 5),
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        if len(features) != 2:
            raise ValueError(f"features must hold 2 widths (f1, f2), got {list(features)}")
        for f in features:
            _check_positive("features", f)
        if len(kernel_sizes) != 3:
            raise ValueError(f"kernel_sizes must hold 3 sizes, got {list(kernel_sizes)}")
        for k in kernel_sizes:
            _check_odd_kernel("kernel_sizes", k)
        self._config = {
            "in_channels": in_channels, "features": list(features),
            "kernel_sizes": list(kernel_sizes),
        }
        f1, f2 = features
        k1, k2, k3 = kernel_sizes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, f1, k1, padding=k1 // 2, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(f1, f2, k2, padding=k2 // 2, padding_mode="replicate"),
            nn.ReLU(),
            nn.Conv2d(f2, in_channels, k3, padding=k3 // 2, padding_mode="replicate"),
        )

    @property
    def config(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


class _ResBlock(nn.Module):
    def __init__(self, features: int, res_scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.relu = nn.ReLU()
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.res_scale * self.conv2(self.relu(self.conv1(x)))
        return out


class EDSR(nn.Module):
    """EDSR-style residual SR network on the cubic-upsampled grid (global residual)."""

    def __init__(
        self,
        in_channels: int = 1,
        features: int = 64,
        num_blocks: int = 16,
        res_scale: float = 0.1,
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("features", features)
        _check_positive("num_blocks", num_blocks)
        if not 0.0 < float(res_scale) <= 1.0:
            raise ValueError(f"res_scale must be in (0, 1], got {res_scale!r}")
        self._config = {
            "in_channels": in_channels, "features": features,
            "num_blocks": num_blocks, "res_scale": float(res_scale),
        }
        self.head = nn.Conv2d(in_channels, features, 3, padding=1)
        self.body = nn.Sequential(
            *[_ResBlock(features, float(res_scale)) for _ in range(num_blocks)]
        )
        self.body_tail = nn.Conv2d(features, features, 3, padding=1)
        self.tail = nn.Conv2d(features, in_channels, 3, padding=1)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.body_tail(self.body(h))
        out: torch.Tensor = x + self.tail(h)
        return out


NETWORKS: dict[str, type[nn.Module]] = {
    "redcnn": REDCNN,
    "dncnn": DnCNN,
    "srcnn": SRCNN,
    "edsr": EDSR,
}

_DEFAULT_NET = {"denoise": "redcnn", "sr": "edsr"}


def default_net(task: str) -> str:
    if task not in _DEFAULT_NET:
        raise ValueError(f"task must be 'denoise' or 'sr', not {task!r}")
    return _DEFAULT_NET[task]


def build_network(name: str, config: dict[str, Any] | None = None) -> nn.Module:
    """A network by name from its plain-dict config (as stored in a model file)."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(NETWORKS)}")
    try:
        return NETWORKS[name](**(config or {}))
    except TypeError as exc:
        raise ValueError(f"bad config for {name}: {exc}") from None
