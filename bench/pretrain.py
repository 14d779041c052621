"""Benchmark: SimCLR pretraining throughput against the encoder's own forward+backward rate.

On tile stores you give (e.g. results/demo/tiles/*.zarr) measures, in one run:

- ``train_ips``: images/s (two views per tile count as two images) of `pretrain` itself for
  one short epoch: slide reads in DataLoader workers, augmentations, AMP + channels_last on
  CUDA, NT-Xent, Adam;
- ``fb_ips``: images/s of the SimCLR model's forward+backward+step alone on random batches of
  the same shape on the same device (the ceiling the data pipeline should reach).

The last line is ``train_ips=<x> fb_ips=<x> ratio=<train/fb>``.

    python bench/pretrain.py results/demo/tiles/*.zarr [--mag 20x] [--crop 224] [--batch-size 256]
                             [--steps 20] [--workers 4] [--device auto]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def forward_backward_ips(crop: int, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of SimCLR forward+backward+Adam step on random (2B, 3, crop, crop) batches."""
    from pipeline.features.pretrain import SimCLR, nt_xent

    model = SimCLR().to(device)
    cuda = device.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(2 * batch, 3, crop, crop, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            z = model(x)
        loss = nt_xent(z[:batch], z[batch:], 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    return 2 * batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--mag", default="20x")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="training steps measured (one epoch of this many)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from pipeline.devices import resolve_device
    from pipeline.features.pretrain import PretrainConfig, pretrain

    device = resolve_device(a.device)
    per_slide = -(-a.steps * a.batch_size // len(a.stores))  # enough tiles for `steps` batches
    cfg = PretrainConfig(epochs=1, batch_size=a.batch_size, crop=a.crop, tiles_per_slide=per_slide,
                         num_workers=a.workers, device=str(device))
    with tempfile.TemporaryDirectory() as d:
        s = pretrain(a.stores, a.mag.split(","), Path(d) / "w.pth", cfg)
    train_ips = s["images_per_s"]  # views, two per tile
    fb_ips = forward_backward_ips(a.crop, a.batch_size, min(a.steps, 10), device)
    print(f"device={device} crop={a.crop} batch={a.batch_size} tiles={s['tiles']} steps={s['steps_per_epoch']}")
    print(f"train_ips={train_ips:.1f} fb_ips={fb_ips:.1f} ratio={train_ips / fb_ips:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
