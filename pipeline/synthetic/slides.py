"""Streaming writer of tiled pyramidal JPEG TIFFs that OpenSlide opens as "generic-tiff".

Used by the demo cohort and the benchmark slide: every pyramid level is produced tile by tile
from a callback, so a 100k x 80k px slide never sits in memory. Levels are successive pages
(OpenSlide's generic-tiff ignores SubIFDs) and carry real resolution tags, so the µm/px is real.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from pipeline.atomic import atomic_path

TileFn = Callable[[int, int, int, int, int], np.ndarray]
"""tile_fn(level, y, x, h, w) -> (h, w, 3) uint8 pixels of that level at row y, column x."""

MIN_AUTO_LEVELS = 3  # the pipeline's 20x/10x/5x reads want a real pyramid even on small slides
AUTO_STOP_SIDE = 1024  # auto pyramids stop at the first level whose shorter side is below this
ENCODE_BUFFER = 32 << 20  # bytes of raw tiles tifffile may hold per encoding batch (keeps RSS low)


def level_shapes(
    shape_hw: tuple[int, int], n_levels: int | None = None, downsample: int = 4
) -> list[tuple[int, int]]:
    """(h, w) of every level: level k is ceil(level-0 / downsample**k); auto stops below ~1024 px."""
    h, w = int(shape_hw[0]), int(shape_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"image shape must be positive, got {shape_hw}")
    if downsample < 2:
        raise ValueError(f"downsample must be >= 2, got {downsample}")
    shapes = [(h, w)]
    while True:
        if n_levels is not None and len(shapes) >= n_levels:
            break
        last_h, last_w = shapes[-1]
        if n_levels is None and len(shapes) >= MIN_AUTO_LEVELS and min(last_h, last_w) < AUTO_STOP_SIDE:
            break
        if last_h == 1 and last_w == 1:  # cannot shrink further
            break
        d = downsample ** len(shapes)
        shapes.append((math.ceil(h / d), math.ceil(w / d)))
    return shapes


def _tiles(tile_fn: TileFn, level: int, shape: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    """Row-major tiles of one level, clipped at the right/bottom edges (tifffile pads them)."""
    h, w = shape
    for y in range(0, h, tile):
        th = min(tile, h - y)
        for x in range(0, w, tile):
            tw = min(tile, w - x)
            a = tile_fn(level, y, x, th, tw)
            if a.shape != (th, tw, 3) or a.dtype != np.uint8:
                raise ValueError(
                    f"tile_fn(level={level}, y={y}, x={x}, h={th}, w={tw}) returned "
                    f"{a.shape} {a.dtype}, expected ({th}, {tw}, 3) uint8"
                )
            yield a


def write_pyramid_tiff(
    path: str | Path,
    shape_hw: tuple[int, int],
    tile_fn: TileFn,
    mpp: float,
    n_levels: int | None = None,
    downsample: int = 4,
    tile: int = 256,
    quality: int = 85,
    description: str | None = None,
    maxworkers: int | None = None,
) -> list[tuple[int, int]]:
    """Write a tiled pyramidal JPEG TIFF (YCbCr 4:2:0, like SVS) from `tile_fn`, atomically.

    Level 0 is `shape_hw` at `mpp` µm/px; level k is downsampled by `downsample**k`
    (`n_levels=None`: at least 3 levels, until the shorter side drops below ~1024 px).
    Resolution tags are in CENTIMETER units (1e4 / mpp px/cm) so readers get the real µm/px.
    The file appears at `path` only once complete (written under a temporary name by
    :func:`pipeline.atomic.atomic_path`, then renamed).
    Returns the (h, w) of every level.
    """
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16 (JPEG 4:2:0 blocks), got {tile}")
    path = Path(path)
    shapes = level_shapes(shape_hw, n_levels, downsample)
    h0, w0 = shapes[0]
    if description is None:
        description = f"pipeline.synthetic.slides pyramidal TIFF; mpp={mpp:g}; levels={len(shapes)}"
    bigtiff = sum(h * w * 3 for h, w in shapes) > 2**31  # JPEG shrinks it, but stay safe
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
        for level, (h, w) in enumerate(shapes):
            # actual per-axis downsample (ceil makes it slightly below downsample**k)
            res = (1e4 / (mpp * w0 / w), 1e4 / (mpp * h0 / h))
            tw.write(
                _tiles(tile_fn, level, (h, w), tile),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": int(quality)},
                resolution=res,
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description=description if level == 0 else None,
                metadata=None,
                maxworkers=maxworkers,
                buffersize=ENCODE_BUFFER,
            )
    return shapes


def array_tile_fn(levels: list[np.ndarray]) -> TileFn:
    """A tile_fn that slices in-memory level images (for slides small enough to hold)."""

    def fn(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        return levels[level][y : y + h, x : x + w]

    return fn
