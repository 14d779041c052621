"""Tiling commands (workflow/rules/tiling.smk): `tile` one slide, `summarize-tiles` of a cohort."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.cli import command
from pipeline.cli.args import _names
from pipeline.errors import SlideError


def _tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file (or DICOM folder)")
    p.add_argument("--out", required=True, help="tile store to write (<slide_id>.zarr)")
    p.add_argument("--mpp", type=float, default=None, help="override the scan resolution (µm/px)")
    p.add_argument("--config", default=None, help="config.yaml (its `tiling:` block is used)")
    p.add_argument("--tiling", default=None, help="tiling options as JSON (override --config)")
    p.add_argument("--slide-id", default=None, help="id recorded in the store (default: file stem)")
    p.add_argument("--qc", default=None, help="QC thumbnail PNG to write")
    p.add_argument("--mask", default=None, help="tissue mask PNG to write")
    p.add_argument("--annotations", default=None, help="QuPath GeoJSON or ASAP XML of the slide (with --include/--exclude)")
    p.add_argument("--include", default="", help="comma-separated classes: tile only inside them")
    p.add_argument("--exclude", default="", help="comma-separated classes: never tile inside them (e.g. pen marks)")
    p.add_argument("--record-failure", action="store_true",
                   help="on a slide error, write a failed store (and placeholder PNGs) and exit 0")


@command("tile", _tile_args)
def _tile(args: argparse.Namespace) -> int:
    """Mask tissue and tile one slide at every magnification into a tile store."""
    from pipeline.config import TilingConfig, json_options, load_config
    from pipeline.tiling.stage import record_failure, tile_to_store

    block = json_options(args.tiling, "--tiling") if args.tiling is not None else load_config(args.config).get("tiling")
    cfg = TilingConfig.from_dict(block)
    try:
        tile_to_store(args.slide, args.out, cfg, mpp=args.mpp, slide_id=args.slide_id,
                      qc_png=args.qc, mask_png=args.mask, annotations=args.annotations,
                      include=_names(args.include), exclude=_names(args.exclude))
    except SlideError as e:
        if not args.record_failure:
            raise
        record_failure(args.out, e, args.slide_id, args.qc, args.mask)
        print(f"error: {e}", file=sys.stderr)
    return 0


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="tile or feature stores")
    p.add_argument("--out", required=True, help="per-slide table (TSV)")
    p.add_argument("--failed", default=None, help="failed-slides table (TSV)")


@command("summarize-tiles", _summary_args)
def _summarize(args: argparse.Namespace) -> int:
    """Tables of tiles per slide and of failed slides."""
    from pipeline.report.summary import write_summary

    df = write_summary(args.stores, args.out, args.failed)
    n_bad = int((df["status"] != "ok").sum())
    logging.info("%d slides, %d failed -> %s", len(df), n_bad, args.out)
    return 0
