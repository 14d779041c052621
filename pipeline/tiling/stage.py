"""The tiling stage as a library call: slide -> tile store + mask PNG + QC thumbnail."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.config import TilingConfig
from pipeline.errors import SlideError
from pipeline.slides import fingerprint, open_slide
from pipeline.store import TileStoreMeta, write_failed_store, write_tile_store
from pipeline.tiling.grid import TilingResult, tile_slide
from pipeline.tiling.qc import qc_image, write_mask_png, write_png

log = logging.getLogger(__name__)


def tile_to_store(slide_path: str | Path, out: str | Path, cfg: TilingConfig, mpp: float | None = None,
                  slide_id: str | None = None, qc_png: str | Path | None = None,
                  mask_png: str | Path | None = None, annotations: str | Path | None = None,
                  include: list[str] | None = None, exclude: list[str] | None = None) -> dict[str, int]:
    """Tile one slide into `out`; returns the tile count per magnification. Raises SlideError.

    `annotations` (QuPath GeoJSON or ASAP XML) with `include` / `exclude` class names restricts
    the tissue mask: tiles only inside the include classes, never inside the exclude ones.
    """
    slide_path = Path(slide_path)
    slide_id = slide_id or slide_path.stem
    restrict, provenance = None, None
    with open_slide(slide_path, mpp=mpp) as slide:
        info = slide.info
        if annotations and (include or exclude):
            from pipeline.slides.annotations import (
                AnnotationError,
                mask_restriction,
                read_annotations,
            )

            try:
                ann = read_annotations(annotations, (info.width, info.height))
            except AnnotationError as e:
                raise SlideError(slide_id, str(e)) from e
            restrict = mask_restriction(ann, include or [], exclude or [], where=str(annotations))
            provenance = {"file": str(Path(annotations).resolve()), "fingerprint": fingerprint(annotations),
                          "include": list(include or []), "exclude": list(exclude or []), "classes": sorted(ann)}
        res = tile_slide(slide, cfg, restrict)
    counts = {name: len(ts) for name, ts in res.tiles.items()}
    if not any(counts.values()):
        log.warning("%s: no tissue found; writing an empty store", slide_id)
    stat = os.stat(slide_path)
    meta = TileStoreMeta(
        slide_id=slide_id,
        slide_path=str(slide_path.resolve()),
        slide_size_bytes=stat.st_size,
        slide_mtime=stat.st_mtime,
        slide_fingerprint=fingerprint(slide_path),
        vendor=info.vendor,
        backend=info.backend,
        level0_size=(info.width, info.height),
        base_mpp=info.mpp,
        mpp_source=info.mpp_source,
        tiling=cfg.to_dict(),
        mask_mpp=res.mask_mpp,
        tile_px_level0={name: res.grid.finest_px * 2**i for i, name in enumerate(res.tiles)},
        region_grid=(res.grid.region_rows, res.grid.region_cols),
        annotations=provenance,
    )
    # The pictures are drawn and encoded (OpenCV, GIL released) while Zarr writes the store.
    with ThreadPoolExecutor(1) as pool:
        pictures = pool.submit(_write_pictures, res, info.mpp, meta.tile_px_level0, qc_png, mask_png)
        write_tile_store(out, res.tiles, meta)
        pictures.result()
    log.info("%s: base %.4g µm/px (%s), tiles %s", slide_id, info.mpp, info.mpp_source,
             ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def _write_pictures(res: TilingResult, base_mpp: float, tile_px: dict[str, float], qc_png, mask_png) -> None:
    """The mask PNG and the QC picture (tissue contour, finest tiles, coarsest regions)."""
    if mask_png:
        write_mask_png(mask_png, res.mask)
    if qc_png:
        write_png(qc_png, qc_image(res.thumbnail, res.mask, res.thumb_mpp / base_mpp, res.tiles, tile_px))


def error_png(path: str | Path, message: str) -> None:
    """A small grey picture carrying the error, so a failed slide still shows in the report."""
    import cv2

    img = np.full((160, 900, 3), 235, np.uint8)
    words, lines, line = message.split(), [], ""
    for w in words:
        if len(line) + len(w) > 70:
            lines.append(line)
            line = ""
        line += w + " "
    lines.append(line)
    for i, text in enumerate(["FAILED"] + lines[:5]):
        cv2.putText(img, text, (12, 28 + 24 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (180, 0, 0) if i == 0 else (40, 40, 40), 1, cv2.LINE_AA)
    write_png(path, img)


def record_failure(out: str | Path, err: SlideError, slide_id: str | None = None, qc_png=None, mask_png=None) -> None:
    """Write a failed tile store (and placeholder PNGs) so the workflow goes on."""
    write_failed_store(out, "tiles", slide_id or err.slide, str(err))
    for p in (qc_png, mask_png):
        if p:
            error_png(p, str(err))
