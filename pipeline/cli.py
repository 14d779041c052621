"""Command line: `python -m pipeline <command>` (also the `m2otca-pipeline` console script).

Every command is a thin wrapper over a library function. A per-slide failure exits non-zero with
ONE line on stderr naming the slide and the cause (a traceback only with --debug);
`--record-failure` instead writes a failed store so a workflow goes on with the other slides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import SheetError, SlideError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args) -> exit code` as a sub-command."""

    def deco(fn):
        COMMANDS[name] = (add_args, fn)
        return fn

    return deco


def _tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file (or DICOM folder)")
    p.add_argument("--out", required=True, help="tile store to write (<slide_id>.zarr)")
    p.add_argument("--mpp", type=float, default=None, help="override the scan resolution (µm/px)")
    p.add_argument("--config", default=None, help="config.yaml (its `tiling:` block is used)")
    p.add_argument("--tiling", default=None, help="tiling options as JSON (override --config)")
    p.add_argument("--slide-id", default=None, help="id recorded in the store (default: file stem)")
    p.add_argument("--qc", default=None, help="QC thumbnail PNG to write")
    p.add_argument("--mask", default=None, help="tissue mask PNG to write")
    p.add_argument("--record-failure", action="store_true",
                   help="on a slide error, write a failed store (and placeholder PNGs) and exit 0")


@command("tile", _tile_args)
def _tile(args: argparse.Namespace) -> int:
    """Mask tissue and tile one slide at every magnification into a tile store."""
    from pipeline.config import TilingConfig, load_config
    from pipeline.tile_stage import record_failure, tile_to_store

    block = json.loads(args.tiling) if args.tiling else load_config(args.config).get("tiling")
    cfg = TilingConfig.from_dict(block)
    try:
        tile_to_store(args.slide, args.out, cfg, mpp=args.mpp, slide_id=args.slide_id,
                      qc_png=args.qc, mask_png=args.mask)
    except SlideError as e:
        if not args.record_failure:
            raise
        record_failure(args.out, e, args.slide_id, args.qc, args.mask)
        print(f"error: {e}", file=sys.stderr)
    return 0


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="tile store (<slide_id>.zarr) made by `tile`")
    p.add_argument("--slide", default=None, help="slide file (default: the path recorded in the tile store)")
    p.add_argument("--encoder", required=True, help="resnet18_simclr, uni or timm:<name>")
    p.add_argument("--weights", default=None, help="local weights file (none: random init, with a warning)")
    p.add_argument("--out", required=True, help="feature store to write")
    p.add_argument("--mpp", type=float, default=None, help="override the scan resolution (µm/px)")
    p.add_argument("--mags", default=None, help="comma-separated magnifications (default: all in the store)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--on-tile-error", choices=["fail", "record"], default="fail",
                   help="a tile that fails to decode fails the slide, or is recorded and masked")
    p.add_argument("--record-failure", action="store_true",
                   help="on a slide error, write a failed feature store and exit 0")


@command("extract", _extract_args)
def _extract(args: argparse.Namespace) -> int:
    """Encode every tile of a tile store into a feature store (resumable)."""
    from pipeline.extract import ExtractConfig, extract_features
    from pipeline.store import StoreBusy, write_failed_store

    cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                        compile=args.compile, on_tile_error=args.on_tile_error)
    mags = args.mags.split(",") if args.mags else None
    try:
        extract_features(args.store, args.out, args.encoder, args.weights, slide=args.slide, mpp=args.mpp,
                         mags=mags, cfg=cfg)
    except StoreBusy as e:
        print(f"error: {Path(args.store).name}: {e}; stopping", file=sys.stderr)
        return 75
    except SlideError as e:
        if not args.record_failure:
            raise
        write_failed_store(args.out, "features", e.slide, str(e), {"encoder": args.encoder})
        print(f"error: {e}", file=sys.stderr)
    return 0


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="tile or feature stores")
    p.add_argument("--out", required=True, help="per-slide table (TSV)")
    p.add_argument("--failed", default=None, help="failed-slides table (TSV)")


@command("summarize-tiles", _summary_args)
def _summarize(args: argparse.Namespace) -> int:
    """Tables of tiles per slide and of failed slides."""
    from pipeline.summary import write_summary

    df = write_summary(args.stores, args.out, args.failed)
    n_bad = int((df["status"] != "ok").sum())
    logging.info("%d slides, %d failed -> %s", len(df), n_bad, args.out)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the slides and slides.tsv")
    p.add_argument("--n", type=int, default=24, help="number of slides")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--scale", type=float, default=1.0, help="slide size factor (0.3 for tests)")


@command("demo-cohort", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """Write the synthetic demo cohort (pyramidal TIFFs + slides.tsv)."""
    from pipeline.demo import make_demo_cohort

    sheet = make_demo_cohort(Path(args.out), n_slides=args.n, seed=args.seed, scale=args.scale)
    logging.info("demo cohort sheet: %s", sheet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.captureWarnings(True)  # warnings go to the log (stdout); stderr is for the error line
    try:
        return int(args.func(args) or 0)
    except (SlideError, SheetError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one readable line
        if args.debug:
            raise
        where = getattr(args, "slide", None) or getattr(args, "store", None) or ""
        prefix = f"{Path(where).name}: " if where else ""
        print(f"error: {prefix}{type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
