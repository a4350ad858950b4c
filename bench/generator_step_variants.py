"""Training-step time of the cpu preset's networks, eager against torch.compile and channels_last.

    OMP_NUM_THREADS=2 .venv/bin/python bench/generator_step_variants.py ARM NET [STEPS]

ARM is ``eager``, ``compile`` (``torch.compile`` of the network, inductor's default mode) or
``channels_last`` (weights and inputs in that memory format); NET is ``unet`` (batch 32 of
32x32x3 latents, the cpu preset's diffusion step) or ``ae`` (batch 16 of 64x64 images through
encode and decode, its autoencoder step). Every step is the preset's: bf16 autocast, AdamW, one
backward pass, random data (the time of a step does not depend on the pixels). Prints the
first step (compilation included) and the median of the others, and for ``unet`` the FLOPs of
one step (``torch.utils.flop_counter``). Run each arm in its own process, alternating, and
copy the figures to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from node.generator.networks import build_autoencoder, build_unet
    from node.generator.presets import PRESETS, config_from_dict

    arm, net = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    if arm not in ("eager", "compile", "channels_last") or net not in ("unet", "ae"):
        sys.exit(__doc__)
    cfg = config_from_dict({**PRESETS["cpu"], "preset": "cpu", "seed": 0})
    torch.manual_seed(0)
    model: Any = build_unet(cfg, 0) if net == "unet" else build_autoencoder(cfg)
    fmt = torch.channels_last if arm == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if net == "unet":
        forward = torch.compile(model) if arm == "compile" else model

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            t = torch.randint(0, cfg.train_timesteps, (x.shape[0],))
            out: torch.Tensor = (forward(x, t).float() - x).pow(2).mean()
            return out

        shape = (cfg.diffusion_batch_size, cfg.ae_latent_channels, 32, 32)
    else:
        encode = torch.compile(model.encode) if arm == "compile" else model.encode
        decode = torch.compile(model.decode) if arm == "compile" else model.decode

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            mu, sigma = encode(x)
            recon = decode(mu + sigma * torch.randn_like(sigma)).float()
            out: torch.Tensor = (recon - x).abs().mean() + 1e-6 * mu.float().pow(2).mean()
            return out

        shape = (cfg.ae_batch_size, 1, 64, 64)

    def step() -> float:
        x = torch.rand(shape).contiguous(memory_format=fmt)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss: Any = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    first = step()
    times = [step() for _ in range(steps)]
    line = (f"{arm} {net}: first step {first:.2f} s, median of {steps} "
            f"{statistics.median(times):.4f} s, {torch.get_num_threads()} threads")
    if net == "unet" and arm == "eager":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            x = torch.rand(shape)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                whole: Any = loss_of(x)
            whole.backward()
        flops = counter.get_total_flops()
        line += (f"; {flops / 1e9:.1f} GFLOP a step, "
                 f"{flops / statistics.median(times) / 1e9:.0f} GFLOP/s")
    print(line)


if __name__ == "__main__":
    main()
