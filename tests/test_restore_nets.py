"""Restoration networks: shapes, residual behaviour, config round trip, specific ValueErrors."""

from __future__ import annotations

import pytest
import torch

from coordinator.restore.nets import (
    EDSR,
    NETWORKS,
    REDCNN,
    SRCNN,
    DnCNN,
    build_network,
    default_net,
)

TINY = {
    "redcnn": {"features": 4, "num_layers": 3},
    "dncnn": {"features": 4, "depth": 3},
    "srcnn": {"features": [4, 4], "kernel_sizes": [3, 3, 3]},
    "edsr": {"features": 4, "num_blocks": 1},
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("size", [16, 24])
def test_output_keeps_the_grid(name: str, size: int) -> None:
    net = build_network(name, TINY[name])
    x = torch.rand(2, 1, size, size)
    assert net(x).shape == (2, 1, size, size)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_config_rebuilds_the_same_network(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, TINY[name]).eval()
    again = build_network(name, net.config).eval()
    again.load_state_dict(net.state_dict())
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(net(x), again(x))
    assert net.config == again.config


def test_paper_default_sizes() -> None:
    assert REDCNN().config == {"in_channels": 1, "features": 96, "kernel_size": 5,
                               "num_layers": 5}
    assert sum(1 for m in DnCNN().modules() if isinstance(m, torch.nn.Conv2d)) == 17
    assert SRCNN().config["kernel_sizes"] == [9, 5, 5]
    assert len(EDSR().body) == 16


def test_residual_nets_start_near_identity_for_zero_tail() -> None:
    net = EDSR(features=4, num_blocks=1)
    torch.nn.init.zeros_(net.tail.weight)
    torch.nn.init.zeros_(net.tail.bias)
    x = torch.rand(1, 1, 16, 16)
    assert torch.equal(net(x), x)
    dn = DnCNN(features=4, depth=3, batch_norm=False)
    last = dn.body[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    assert torch.equal(dn(x), x)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: REDCNN(features=0), "features must be a positive integer"),
        (lambda: REDCNN(kernel_size=4), "kernel_size must be odd"),
        (lambda: REDCNN(num_layers=4), "num_layers must be an odd integer >= 3"),
        (lambda: REDCNN(num_layers=1), "num_layers must be an odd integer >= 3"),
        (lambda: DnCNN(depth=2), "depth must be an integer >= 3"),
        (lambda: DnCNN(in_channels=0), "in_channels must be a positive integer"),
        (lambda: SRCNN(features=[8]), "features must hold 2 widths"),
        (lambda: SRCNN(kernel_sizes=[9, 5]), "kernel_sizes must hold 3 sizes"),
        (lambda: SRCNN(kernel_sizes=[9, 4, 5]), "kernel_sizes must be odd"),
        (lambda: EDSR(num_blocks=0), "num_blocks must be a positive integer"),
        (lambda: EDSR(res_scale=0.0), r"res_scale must be in \(0, 1\]"),
        (lambda: EDSR(features=True), "features must be a positive integer"),
        (lambda: build_network("unet"), "unknown network 'unet'"),
        (lambda: build_network("edsr", {"depth": 3}), "bad config for edsr"),
        (lambda: default_net("deblur"), "task must be"),
    ],
)
def test_bad_config_raises_specific_error(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


def test_default_nets_per_task() -> None:
    assert default_net("denoise") == "redcnn"
    assert default_net("sr") == "edsr"
