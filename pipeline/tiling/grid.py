"""Aligned 20x/10x/5x tiling on one nested grid anchored at level-0 (0, 0).

The finest tile covers `f = tile_size * mpp_finest / base_mpp` level-0 px; magnification i
(0 = finest) covers `2**i * f`, so a coarsest cell ("region") holds exactly 2x2 tiles of the
next finer magnification, 4x4 of the one after. Tiles are ordered by region in raster order,
then by position inside the region, the same at every magnification.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.config import TilingConfig
from pipeline.errors import SlideError
from pipeline.slides import Slide, SlideInfo
from pipeline.store.contract import TileSet

log = logging.getLogger(__name__)
MASK_FINEST_MPP = 1.0  # µm/px: finer levels are area-reduced to this (finer finds no more tissue, costs more)
BAND_PIXELS = 4_000_000  # mask pixels per summed-area band while measuring tile tissue fractions
QC_SIDE = 2000  # the RGB thumbnail kept for QC pictures is at most this long (px)


@dataclass
class Grid:
    """Nested grid geometry of one slide."""

    finest_px: float  # level-0 px per finest tile side
    n_levels: int  # number of magnifications
    region_rows: int
    region_cols: int

    def factor(self, i: int) -> int:
        return 2**i

    def cells_per_region(self, i: int) -> int:
        return 2 ** (self.n_levels - 1 - i)


def make_grid(width: int, height: int, base_mpp: float, cfg: TilingConfig) -> Grid:
    """The nested grid for a slide of level-0 size (width, height) at `base_mpp`."""
    finest_mpp = next(iter(cfg.magnifications.values()))
    f = cfg.tile_size * finest_mpp / base_mpp
    n = len(cfg.magnifications)
    region_px = f * 2 ** (n - 1)
    return Grid(f, n, max(1, int(np.ceil(height / region_px))), max(1, int(np.ceil(width / region_px))))


def area_fractions(integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, side: float) -> np.ndarray:
    """Exact mask area fraction of squares [x0, x0+side) x [y0, y0+side) in mask pixel units.

    `integral` is the (H+1, W+1) summed-area table of a 0/1 mask; bilinear interpolation of it
    is the exact integral of the piecewise-constant mask, so fractional tile edges are exact.
    """
    H1, W1 = integral.shape

    def S(x, y):  # summed area over [0, x) x [0, y), clamped to the mask
        x = np.clip(x, 0, W1 - 1)
        y = np.clip(y, 0, H1 - 1)
        xi = np.minimum(np.floor(x).astype(np.int64), W1 - 2)
        yi = np.minimum(np.floor(y).astype(np.int64), H1 - 2)
        fx, fy = x - xi, y - yi
        i00 = integral[yi, xi].astype(np.float64)
        i01 = integral[yi, xi + 1]
        i10 = integral[yi + 1, xi]
        i11 = integral[yi + 1, xi + 1]
        return (i00 * (1 - fx) * (1 - fy) + i01 * fx * (1 - fy) + i10 * (1 - fx) * fy + i11 * fx * fy)

    x1, y1 = x0 + side, y0 + side
    area = S(x1, y1) - S(x0, y1) - S(x1, y0) + S(x0, y0)
    return np.clip(area / (side * side), 0.0, 1.0)


def grid_fractions(mask: np.ndarray, mask_scale: float, grid: Grid) -> list[np.ndarray]:
    """Tissue fraction of every grid cell, (rows_i, cols_i) per magnification i.

    Computed a band of region rows at a time (about BAND_PIXELS mask pixels) from that band's
    summed-area table, so memory stays bounded however big the slide.
    """
    H, W = mask.shape
    region_mask_px = grid.finest_px * 2 ** (grid.n_levels - 1) / mask_scale
    out = [np.zeros((grid.region_rows * grid.cells_per_region(i), grid.region_cols * grid.cells_per_region(i)))
           for i in range(grid.n_levels)]
    step = max(1, int(BAND_PIXELS / (W * region_mask_px)))  # region rows per band
    for R0 in range(0, grid.region_rows, step):
        R1 = min(R0 + step, grid.region_rows)
        y0 = min(H, int(np.floor(R0 * region_mask_px)))
        y1 = min(H, int(np.ceil(R1 * region_mask_px)) + 1)
        if y1 <= y0:
            continue  # the band lies below the mask: no tissue
        band = cv2.integral(mask[y0:y1], sdepth=cv2.CV_32S)  # (h+1, W+1)
        for i in range(grid.n_levels):
            k, cpr = grid.factor(i), grid.cells_per_region(i)
            cols = grid.region_cols * cpr
            r, c = np.divmod(np.arange((R1 - R0) * cpr * cols, dtype=np.int64), cols)
            r += R0 * cpr
            side = k * grid.finest_px / mask_scale
            x = c * k * grid.finest_px / mask_scale
            y = r * k * grid.finest_px / mask_scale - y0
            out[i][R0 * cpr : R1 * cpr] = area_fractions(band, x, y, side).reshape(-1, cols)
    return out


def tile_grid(mask: np.ndarray, mask_scale: float, grid: Grid, cfg: TilingConfig) -> dict[str, TileSet]:
    """Tiles kept at every magnification, with regions, parents and spatial order.

    `mask_scale` is level-0 px per mask px. Every coordinate is computed from the finest-grid
    index (`round(k * f)`), so nested footprints share their corners exactly.
    """
    names = list(cfg.magnifications)
    fractions = grid_fractions(mask, mask_scale, grid)
    out: dict[str, TileSet] = {}
    kept_index: list[np.ndarray] = []  # per magnification: dense (rows, cols) -> kept index or -1
    for i, name in enumerate(names):
        k = grid.factor(i)
        cpr = grid.cells_per_region(i)
        rows, cols = grid.region_rows * cpr, grid.region_cols * cpr
        r, c = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
        fx, fy = c * k, r * k  # finest-grid index of the top-left corner
        frac = fractions[i].reshape(-1)
        keep = frac >= cfg.tissue_threshold - 1e-9
        r, c, fx, fy, frac = r[keep], c[keep], fx[keep], fy[keep], frac[keep]
        region = (r // cpr) * grid.region_cols + (c // cpr)
        order = np.lexsort((c % cpr, r % cpr, region))  # by region, then row, then col inside it
        r, c, fx, fy, frac, region = r[order], c[order], fx[order], fy[order], frac[order], region[order]
        coords = np.stack([np.rint(fx * grid.finest_px), np.rint(fy * grid.finest_px)], 1).astype(np.int64)
        dense = np.full((rows, cols), -1, np.int64)
        dense[r, c] = np.arange(len(r))
        kept_index.append(dense)
        out[name] = TileSet(
            coords=coords,
            grid=np.stack([r, c], 1).astype(np.int32),
            tissue=frac.astype(np.float32),
            region=region.astype(np.int32),
            parent=np.full(len(r), -1, np.int64),
        )
    for i, name in enumerate(names[:-1]):  # link each tile to its parent one magnification coarser
        g = out[name].grid.astype(np.int64)
        out[name].parent = kept_index[i + 1][g[:, 0] // 2, g[:, 1] // 2]
    return out


def check_targets(slide: Slide, cfg: TilingConfig) -> None:
    """Refuse magnifications finer than the scan instead of silently upsampling."""
    if cfg.allow_upsample:
        return
    base = slide.info.mpp
    for name, mpp in cfg.magnifications.items():
        if mpp < base / (1 + cfg.mpp_tolerance):
            raise SlideError(
                slide.name,
                f"target {name} ({mpp} µm/px) is finer than the scan ({base:.4g} µm/px, from "
                f"{slide.info.mpp_source}); set tiling.allow_upsample or drop {name}",
            )


@dataclass
class TilingResult:
    tiles: dict[str, TileSet]
    mask: np.ndarray  # (h, w) uint8 0/1
    thumbnail: np.ndarray  # (h, w, 3) uint8 RGB at `thumb_mpp`, for QC
    mask_mpp: float
    grid: Grid
    thumb_mpp: float


def mask_resolution(info: SlideInfo, cfg: TilingConfig) -> float:
    """µm/px of the tissue mask: one pyramid level at its own resolution, read once.

    The coarsest level not coarser than `cfg.mask_mpp` (so the read is as small as the pyramid
    allows and needs no resampling), but no finer than MASK_FINEST_MPP (a single-level scan is
    area-reduced to it) and no longer than `cfg.mask_max_side` (slides without a deep enough
    pyramid). A level's downsample is taken at its nominal integer value (15.97 -> 16:
    OpenSlide's are ratios of rounded-up level sizes), as hs2p and CLAM do.
    """
    nominal = [float(round(d)) if abs(d - round(d)) <= 0.01 * d else d for d in info.level_downsamples]
    level_mpps = [info.mpp * d for d in nominal] or [info.mpp]
    fit = [m for m in level_mpps if m <= cfg.mask_mpp * (1 + 1e-3)]
    native = max(fit) if fit else min(level_mpps)
    return max(native, min(MASK_FINEST_MPP, cfg.mask_mpp), info.mpp * max(info.width, info.height) / cfg.mask_max_side)


def read_mask_inputs(slide: Slide, mask_mpp: float, max_read_pixels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """HSV saturation at `mask_mpp` and an RGB QC picture `k` times coarser, from one read.

    The slide is read block by block at the mask's resolution; each block gives its saturation
    and, area-reduced by the integer `k` that brings the picture under QC_SIDE, its part of the
    QC picture. The full-size RGB image exists only when it is the QC picture itself (k = 1).
    Returns (saturation (h, w) uint8, QC picture (ceil(h/k), ceil(w/k), 3) uint8, k).
    """
    from pipeline.tiling.tissue import saturation

    h, w = slide.thumbnail_shape(mask_mpp)
    k = max(1, math.ceil(max(h, w) / QC_SIDE))
    sat = np.empty((h, w), np.uint8)
    qc = np.empty((-(-h // k), -(-w // k), 3), np.uint8)
    for by, bx, img in slide.thumbnail_blocks(mask_mpp, max_read_pixels, align=k):
        bh, bw = img.shape[:2]
        sat[by : by + bh, bx : bx + bw] = saturation(img)
        if k > 1:  # blocks are multiples of k but at the last row/col: no seams
            img = cv2.resize(img, (-(-bw // k), -(-bh // k)), interpolation=cv2.INTER_AREA)
        qc[by // k : by // k + img.shape[0], bx // k : bx // k + img.shape[1]] = img
    return sat, qc, k


def tile_slide(slide: Slide, cfg: TilingConfig,
               restrict: Callable[[np.ndarray, float], np.ndarray] | None = None) -> TilingResult:
    """Mask tissue and tile the slide at every configured magnification (one slide read).

    `restrict(mask, level-0 px per mask px) -> mask`, when given, edits the tissue mask before
    tiling (annotated include / exclude regions, :func:`pipeline.slides.annotations.mask_restriction`).
    """
    from pipeline.tiling.tissue import tissue_mask_from_saturation

    check_targets(slide, cfg)
    info = slide.info
    mask_mpp = mask_resolution(info, cfg)
    sat, thumb, k = read_mask_inputs(slide, mask_mpp, cfg.max_read_pixels)
    mask = tissue_mask_from_saturation(sat, mask_mpp, cfg.saturation_floor, cfg.min_component_um2, cfg.max_hole_um2)
    del sat
    if restrict is not None:
        mask = restrict(mask, mask_mpp / info.mpp)
    grid = make_grid(info.width, info.height, info.mpp, cfg)
    tiles = tile_grid(mask, mask_mpp / info.mpp, grid, cfg)
    return TilingResult(tiles=tiles, mask=mask, thumbnail=thumb, mask_mpp=mask_mpp, grid=grid, thumb_mpp=mask_mpp * k)
