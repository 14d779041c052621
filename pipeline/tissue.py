"""Tissue masking on a low-resolution thumbnail (HSV saturation + Otsu, cleaned with OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    saturation_floor: int = 20,
    min_component_um2: float = 20000.0,
    max_hole_um2: float = 40000.0,
) -> np.ndarray:
    """Binary tissue mask (H, W) uint8 in {0, 1} of an RGB thumbnail at `mpp` µm/px.

    Saturation separates stained tissue from white/grey glass; Otsu adapts to the stain, the
    floor stops it from splitting pure background into two classes on slides without tissue.
    """
    px_area = mpp * mpp  # µm² per mask pixel
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]  # (H, W) uint8
    k = 5 if min(sat.shape) >= 5 else 1
    sat = cv2.medianBlur(sat, k)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = max(float(otsu), float(saturation_floor))
    mask = (sat > thr).astype(np.uint8)
    # Close small gaps between nuclei / stroma fibres (about 3 mask px).
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    mask = _fill_small_holes(mask, max_hole_um2 / px_area)
    return _drop_small_components(mask, min_component_um2 / px_area)


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background components enclosed by tissue that are smaller than `max_area_px`."""
    inv = (1 - mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return mask
    H, W = mask.shape
    x, y, w, h, area = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3], stats[:, 4]
    touches_border = (x == 0) | (y == 0) | (x + w == W) | (y + h == H)
    fill = (area < max_area_px) & ~touches_border
    fill[0] = False  # label 0 is the tissue itself (inv == 0)
    out = mask.copy()
    out[fill[labels] & (inv == 1)] = 1
    return out


def _drop_small_components(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Remove tissue components smaller than `min_area_px` (dust, debris, pen dots)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # label 0 is the background
    return keep[labels].astype(np.uint8)
