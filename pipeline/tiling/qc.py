"""QC thumbnail: the slide with its tissue contour and the kept finest/coarsest tiles drawn over it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.atomic import atomic_path
from pipeline.store import TileSet

_CONTOUR = (0, 200, 0)  # RGB green: tissue outline
_FINE = (30, 110, 255)  # RGB blue: finest tiles
_COARSE = (255, 140, 0)  # RGB orange: coarsest tiles (regions)


def qc_image(thumb: np.ndarray, mask: np.ndarray, thumb_scale: float, tiles: dict[str, TileSet],
             tile_px: dict[str, float], target_side: int = 1600) -> np.ndarray:
    """RGB QC picture; `thumb_scale` = level-0 px per thumbnail px, `tile_px` = level-0 side per magnification."""
    zoom = min(4.0, target_side / max(thumb.shape[:2]))  # small slides up, huge slides down
    interp = cv2.INTER_LINEAR if zoom > 1 else cv2.INTER_AREA
    img = cv2.resize(thumb, None, fx=zoom, fy=zoom, interpolation=interp) if zoom != 1 else thumb.copy()
    m = cv2.resize(mask, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    s = zoom / thumb_scale  # picture px per level-0 px
    names = list(tiles)
    if names:
        layers = [(names[0], _FINE, 1)] + ([(names[-1], _COARSE, 2)] if len(names) > 1 else [])
        for name, colour, width in layers:
            overlay = img.copy()
            cv2.polylines(overlay, tile_outlines(tiles[name].coords, s, tile_px[name] * s), True, colour, width)
            img = cv2.addWeighted(overlay, 0.6, img, 0.4, 0)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, _CONTOUR, 2)
    return img


def tile_outlines(coords: np.ndarray, scale: float, side: float) -> list[np.ndarray]:
    """Corner lists (4, 1, 2) int32 of the tiles' squares in picture px, for one cv2.polylines call.

    Same pixels as one cv2.rectangle per tile (OpenCV draws rectangles as closed polylines),
    without a Python loop over tens of thousands of tiles.
    """
    p0 = np.rint(coords * scale).astype(np.int32)  # (N, 2) x, y
    p1 = np.rint(coords * scale + side).astype(np.int32) - 1
    quads = np.stack([p0, np.stack([p1[:, 0], p0[:, 1]], 1), p1, np.stack([p0[:, 0], p1[:, 1]], 1)], 1)
    return list(quads.reshape(-1, 4, 1, 2))


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """RGB (H, W, 3) or grey (H, W) uint8 array -> PNG (OpenCV writes BGR)."""
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb):
            raise OSError(f"cannot write {path}")


def write_mask_png(path: str | Path, mask: np.ndarray) -> None:
    """Mask as a black/white PNG (tissue white)."""
    write_png(path, (mask * 255).astype(np.uint8))
