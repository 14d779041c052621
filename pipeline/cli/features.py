"""Feature commands (workflow/rules/features.smk): `extract` a tile store's features,
`pretrain` the SimCLR encoder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import command
from pipeline.cli.args import _names
from pipeline.errors import ConfigError, SlideError


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="tile store (<slide_id>.zarr) made by `tile`")
    p.add_argument("--slide", default=None, help="slide file (default: the path recorded in the tile store)")
    p.add_argument("--encoder", required=True, help="resnet18_simclr, uni or timm:<name>")
    p.add_argument("--weights", action="append", default=[], metavar="[MAG=]FILE",
                   help="local weights file, or MAG=FILE per magnification (repeat); none: random init, with a warning")
    p.add_argument("--out", required=True, help="feature store to write")
    p.add_argument("--mags", default=None, help="comma-separated magnifications (default: all in the store)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--on-tile-error", choices=["fail", "record"], default="fail",
                   help="a tile that fails to decode fails the slide, or is recorded and masked")
    p.add_argument("--record-failure", action="store_true",
                   help="on a slide error, write a failed feature store and exit 0")


def _weights_arg(values: list[str]) -> str | None | dict[str, str]:
    """`--weights FILE` (every magnification) or `--weights MAG=FILE` repeated (one model each)."""
    if not values:
        return None
    per_mag = {}
    for v in values:
        mag, sep, f = v.partition("=")
        if sep and mag and "/" not in mag and not Path(v).exists():
            per_mag[mag] = f
        elif len(values) == 1:
            return v
        else:
            raise ConfigError(f"--weights: give one FILE or MAG=FILE per magnification, got {values}")
    return per_mag


@command("extract", _extract_args)
def _extract(args: argparse.Namespace) -> int:
    """Encode every tile of a tile store into a feature store (resumable)."""
    from pipeline.features.extract import ExtractConfig, extract_features
    from pipeline.store import StoreBusy, write_failed_store

    cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                        compile=args.compile, on_tile_error=args.on_tile_error)
    mags = args.mags.split(",") if args.mags else None
    try:
        extract_features(args.store, args.out, args.encoder, _weights_arg(args.weights), slide=args.slide, mags=mags,
                         cfg=cfg)
    except StoreBusy as e:
        print(f"error: {Path(args.store).name}: {e}; stopping", file=sys.stderr)
        return 75
    except SlideError as e:
        if not args.record_failure:
            raise
        write_failed_store(args.out, "features", e.slide, str(e), {"encoder": args.encoder})
        print(f"error: {e}", file=sys.stderr)
    return 0


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="tile stores (<slide_id>.zarr) to sample tiles from")
    p.add_argument("--mag", required=True, help="magnification(s) to train on, comma-separated (several: one shared model)")
    p.add_argument("--out", required=True, help="weights file to write (resnet18_simclr, DSMIL layout); its .ckpt sits beside it")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256, help="tiles per step (two views each)")
    p.add_argument("--crop", type=int, default=224, help="view side in px (>= 64)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam peak learning rate (cosine schedule)")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    p.add_argument("--tiles-per-slide", type=int, default=200, help="sampled tiles per slide and magnification")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers reading tiles from the slides")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--summary", default=None, help="JSON summary to write (tiles, loss, images/s, sha256)")


@command("pretrain", _pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    """SimCLR-pretrain resnet18_simclr on tiles of the given stores (resumable; atomic weights)."""
    from pipeline.atomic import write_json
    from pipeline.features.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                         temperature=args.temperature, tiles_per_slide=args.tiles_per_slide, seed=args.seed,
                         num_workers=args.workers, device=args.device)
    summary = pretrain(args.stores, _names(args.mag), args.out, cfg)
    if args.summary:
        write_json(args.summary, summary)
    return 0
