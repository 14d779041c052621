"""Aligned 20x/10x/5x tiling on one nested grid anchored at level-0 (0, 0).

The finest tile covers `f = tile_size * mpp_finest / base_mpp` level-0 px; magnification i
(0 = finest) covers `2**i * f`, so a coarsest cell ("region") holds exactly 2x2 tiles of the
next finer magnification, 4x4 of the one after. Tiles are ordered by region in raster order,
then by position inside the region, the same at every magnification.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.config import TilingConfig
from pipeline.errors import SlideError
from pipeline.slide import Slide

log = logging.getLogger(__name__)
QC_SIDE = 2000  # longest side of the RGB thumbnail kept for QC pictures (px)


@dataclass
class TileSet:
    """The kept tiles of one magnification, in spatial order."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    grid: np.ndarray  # (N, 2) int32 row, col on this magnification's grid
    tissue: np.ndarray  # (N,) float32 tissue area fraction in [0, 1]
    region: np.ndarray  # (N,) int32 raster index of the coarsest cell holding the tile
    parent: np.ndarray  # (N,) int64 index of the parent tile one magnification coarser, -1 if none kept

    def __len__(self) -> int:
        return len(self.coords)


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

    Computed one region row at a time from that band's summed-area table, so memory stays
    one byte per mask pixel however big the slide.
    """
    H, W = mask.shape
    region_mask_px = grid.finest_px * 2 ** (grid.n_levels - 1) / mask_scale
    out = [np.zeros((grid.region_rows * grid.cells_per_region(i), grid.region_cols * grid.cells_per_region(i)))
           for i in range(grid.n_levels)]
    for R in range(grid.region_rows):
        y0 = min(H, int(np.floor(R * region_mask_px)))
        y1 = min(H, int(np.ceil((R + 1) * region_mask_px)) + 1)
        if y1 <= y0:
            continue  # the band lies below the mask: no tissue
        band = cv2.integral(mask[y0:y1], sdepth=cv2.CV_32S)  # (h+1, W+1)
        for i in range(grid.n_levels):
            k, cpr = grid.factor(i), grid.cells_per_region(i)
            cols = grid.region_cols * cpr
            r, c = np.divmod(np.arange(cpr * cols, dtype=np.int64), cols)
            r += R * cpr
            side = k * grid.finest_px / mask_scale
            x = c * k * grid.finest_px / mask_scale
            y = r * k * grid.finest_px / mask_scale - y0
            out[i][R * cpr : (R + 1) * cpr] = area_fractions(band, x, y, side).reshape(cpr, cols)
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


def tile_slide(slide: Slide, cfg: TilingConfig,
               restrict: Callable[[np.ndarray, float], np.ndarray] | None = None) -> TilingResult:
    """Mask tissue and tile the slide at every configured magnification.

    `restrict(mask, level-0 px per mask px) -> mask`, when given, edits the tissue mask before
    tiling (annotated include / exclude regions, :func:`pipeline.annotations.mask_restriction`).
    """
    check_targets(slide, cfg)
    info = slide.info
    mask_mpp = max(cfg.mask_mpp, info.mpp * max(info.width, info.height) / cfg.mask_max_side)
    from pipeline.tissue import saturation, tissue_mask_from_saturation

    # A small RGB picture for QC: coarser than the mask on big slides; on slides small enough
    # that it IS the mask's resolution, the one read serves both (saturation is per pixel).
    qc_mpp = max(mask_mpp, info.mpp * max(info.width, info.height) / QC_SIDE)
    thumb = slide.thumbnail(qc_mpp, cfg.max_read_pixels) if qc_mpp == mask_mpp else None
    # Otherwise saturation is reduced block by block: the full RGB image at mask resolution never
    # exists. The last row/col may run past the slide; that part reads white, so no tissue.
    sat = saturation(thumb) if thumb is not None else slide.thumbnail(mask_mpp, cfg.max_read_pixels, reduce=saturation)
    mask = tissue_mask_from_saturation(sat, mask_mpp, cfg.saturation_floor, cfg.min_component_um2, cfg.max_hole_um2)
    del sat
    scale = mask_mpp / info.mpp
    if restrict is not None:
        mask = restrict(mask, scale)
    grid = make_grid(info.width, info.height, info.mpp, cfg)
    tiles = tile_grid(mask, scale, grid, cfg)
    if thumb is None:
        thumb = slide.thumbnail(qc_mpp, cfg.max_read_pixels)
    return TilingResult(tiles=tiles, mask=mask, thumbnail=thumb, mask_mpp=mask_mpp, grid=grid, thumb_mpp=qc_mpp)
