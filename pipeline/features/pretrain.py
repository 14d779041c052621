"""SimCLR pretraining of `resnet18_simclr` on a cohort's own tiles (Chen et al. 2020; DSMIL).

The encoder is the registry's ResNet-18 with InstanceNorm; a 2-layer projection head
(DSMIL's `l1`, `l2`) feeds NT-Xent. A checkpoint (model, head, optimiser, epoch) is written
atomically after every epoch next to the output, so a killed run resumes from its last epoch
and ends byte-identical to an uninterrupted one (data order, views and init are all seeded).
The final file holds only the encoder in DSMIL's `features.<i>` layout (head dropped), written
atomically: it loads through `build_encoder("resnet18_simclr", weights)`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pipeline.atomic import atomic_path
from pipeline.devices import resolve_device
from pipeline.errors import ConfigError
from pipeline.features.encoders import _RESNET_CHILDREN, ENCODERS, RANDOM_INIT_SEED
from pipeline.features.simclr_data import SimCLRTiles, collate_views, sample_tiles
from pipeline.features.simclr_views import make_views

log = logging.getLogger(__name__)

ENCODER = "resnet18_simclr"
KILL_ENV = "M2OTCA_PRETRAIN_KILL_AT"  # test hook: "epoch:<k>" after k's checkpoint, "step:<n>" mid-epoch


@dataclass
class PretrainConfig:
    epochs: int = 20  # passes over the sampled tiles
    batch_size: int = 256  # tiles per step (2x views); the last partial batch is dropped
    crop: int = 224  # view side in px (RandomResizedCrop output)
    lr: float = 3e-4  # Adam peak learning rate, cosine-decayed to 0 over all steps
    weight_decay: float = 1e-6
    temperature: float = 0.5  # NT-Xent temperature (DSMIL: 0.5)
    proj_dim: int = 128  # projection head output width
    tiles_per_slide: int = 200  # sampled tiles per slide and magnification (every slide represented)
    seed: int = 0
    num_workers: int = 2  # DataLoader workers reading tiles from the slides
    device: str = "auto"  # auto = CUDA when available (AMP bf16 + channels_last), else CPU

    def digest(self) -> str:
        """What a checkpoint must share with the run that resumes it (device/workers aside)."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("num_workers", "device")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


class SimCLR(nn.Module):
    """ResNet-18 (InstanceNorm, as `resnet18_simclr`) + DSMIL's projection head l1 -> ReLU -> l2."""

    def __init__(self, proj_dim: int = 128):
        super().__init__()
        self.encoder = ENCODERS[ENCODER].factory({})
        d = self.encoder.num_features  # 512
        self.l1 = nn.Linear(d, d)
        self.l2 = nn.Linear(d, proj_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(x)  # (B, 512)
        return self.l2(F.relu(self.l1(h)))  # (B, proj_dim)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent over 2B views: each view's positive is its pair, the other 2B-2 are negatives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    b = len(z1)
    sim = z @ z.T / temperature  # (2B, 2B)
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)  # (2B,)
    return F.cross_entropy(sim, target)


def dsmil_state_dict(encoder: nn.Module) -> dict[str, Tensor]:
    """Encoder tensors under DSMIL's `features.<i>.*` keys (i = torchvision child index)."""
    child = {name: i for i, name in enumerate(_RESNET_CHILDREN)}
    out = {}
    for k, v in encoder.state_dict().items():
        head, _, rest = k.partition(".")
        if head not in child:
            raise ValueError(f"encoder key {k} has no DSMIL position")
        out[f"features.{child[head]}.{rest}"] = v.detach().cpu().clone()
    return out


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def _save(obj: Any, final: Path) -> None:
    """torch.save through a buffer (the zip's inner folder is then "archive", not the temporary
    file's name, so equal tensors give equal bytes), renamed into place atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(final) as tmp:
        tmp.write_bytes(buf.getvalue())


def _maybe_kill(kind: str, n: int) -> None:
    """Test hook: SIGKILL this process at a chosen point (`M2OTCA_PRETRAIN_KILL_AT`)."""
    if os.environ.get(KILL_ENV) == f"{kind}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


def _resume(ckpt: Path, cfg: PretrainConfig, model: SimCLR, opt: torch.optim.Optimizer) -> int:
    """Load the last checkpoint of this configuration; returns the first epoch still to run."""
    if not ckpt.exists():
        return 0
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated by a crash of the machine: start over, loudly
        log.warning("checkpoint %s unreadable (%s: %s); starting from epoch 0", ckpt, type(e).__name__, e)
        return 0
    if state.get("config") != cfg.digest():
        log.warning("checkpoint %s was made with another configuration; starting from epoch 0", ckpt)
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    log.info("resuming from %s after epoch %d", ckpt, state["epoch"] + 1)
    return int(state["epoch"]) + 1


def _lr(cfg: PretrainConfig, step: int, total: int) -> float:
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def pretrain(stores: list[str | Path], mags: list[str], out: str | Path,
             cfg: PretrainConfig | None = None) -> dict[str, Any]:
    """Train SimCLR on tiles of `mags` from `stores`; write the encoder to `out` (DSMIL layout).

    Returns a summary (tiles, steps, final loss, images/s, weights sha256).
    """
    from tqdm import tqdm

    cfg = cfg or PretrainConfig()
    if cfg.crop < 64:  # layer4 downsamples 32x; InstanceNorm needs more than 1 spatial element
        raise ConfigError(f"pretraining crop must be >= 64 px, got {cfg.crop}")
    out = Path(out)
    slides = sample_tiles(stores, mags, cfg.tiles_per_slide, cfg.seed)
    ds = SimCLRTiles(slides, cfg.seed)
    n_batches = len(ds) // cfg.batch_size
    if n_batches == 0:
        raise ConfigError(f"tile store(s) {slides[0].store}{' ...' if len(slides) > 1 else ''}: "
                          f"{len(ds)} tiles at {', '.join(mags)}, fewer than one batch of {cfg.batch_size} "
                          "(lower the batch size or raise tiles_per_slide)")
    if n_batches * cfg.batch_size < len(ds):
        log.info("%d tiles: %d batches of %d per epoch (the last %d tiles of each shuffled epoch dropped)",
                 len(ds), n_batches, cfg.batch_size, len(ds) - n_batches * cfg.batch_size)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED + cfg.seed)
        model = SimCLR(cfg.proj_dim)
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = checkpoint_path(out)
    start = _resume(ckpt, cfg, model, opt)  # torch moves the loaded moments to the parameters' device
    total = cfg.epochs * n_batches
    # views are made on the GPU, batched; on the CPU in the DataLoader workers, beside the step
    views_collate = None if cuda or not cfg.num_workers else functools.partial(collate_views, crop=cfg.crop)
    loss_v, rate = float("nan"), 0.0
    t_all, n_all = 0.0, 0
    for epoch in range(start, cfg.epochs):
        ds.set_epoch(epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(ds))[: n_batches * cfg.batch_size]
        loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=order.tolist(), num_workers=cfg.num_workers,
                            pin_memory=cuda, prefetch_factor=2 if cfg.num_workers else None,
                            collate_fn=views_collate)
        model.train()
        bar = tqdm(loader, total=n_batches, desc=f"pretrain {','.join(mags)} epoch {epoch + 1}/{cfg.epochs}",
                   unit="batch", file=sys.stdout, mininterval=1.0 if sys.stdout.isatty() else 15.0,
                   dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        for b, batch in enumerate(bar):  # (B, 3, S, S) uint8 tiles and (B, 2, P) view parameters, or views
            step = epoch * n_batches + b
            _maybe_kill("step", step)
            for g in opt.param_groups:
                g["lr"] = _lr(cfg, step, total)
            if views_collate is None:
                x = make_views(batch[0].to(device, non_blocking=True), batch[1], cfg.crop)  # (2B, 3, c, c)
            else:
                x = batch  # (2B, 3, c, c): each tile's two views adjacent
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                z = model(x).view(len(x) // 2, 2, -1)  # (B, 2, D)
            loss = nt_xent(z[:, 0], z[:, 1], cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise RuntimeError(f"pretraining diverged at epoch {epoch + 1}, step {b + 1}: loss {loss_v}; lower lr")
            seen += len(x)  # images: two views per tile
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_v:.4f}", img_s=f"{rate:.1f}")
        bar.close()
        t_all += time.perf_counter() - t0
        n_all += seen
        log.info("epoch %d/%d: loss %.4f, %.1f images/s", epoch + 1, cfg.epochs, loss_v, rate)
        _save({"model": {k: v.cpu() for k, v in model.state_dict().items()}, "optim": _cpu(opt.state_dict()),
               "epoch": epoch, "config": cfg.digest()}, ckpt)
        _maybe_kill("epoch", epoch)
    model.cpu()
    _save(dsmil_state_dict(model.encoder), out)
    from pipeline.features.encoders import weights_sha256

    summary = {"weights": str(out), "sha256": weights_sha256(out), "mags": mags, "slides": len({s.store for s in slides}),
               "tiles": len(ds), "steps_per_epoch": n_batches, "epochs": cfg.epochs, "resumed_at_epoch": start,
               "final_loss": loss_v, "images_per_s": n_all / t_all if t_all else None, "config": asdict(cfg)}
    log.info("pretrained encoder -> %s (sha256 %s)", out, summary["sha256"][:12])
    return summary


def _cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj

