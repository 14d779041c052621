"""Tissue masking on a low-resolution thumbnail (HSV saturation + Otsu, cleaned with OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np

# Median filter and closing sizes in µm (5 and 3 px at 8 µm/px), so masks made at different
# resolutions (each slide's pyramid level) clean up the same physical features.
MEDIAN_UM = 40.0
CLOSE_UM = 24.0


def odd_px(v: float) -> int:
    """The odd kernel size in pixels nearest to `v` (at least 1)."""
    return max(1, int(round(v)) // 2 * 2 + 1)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (H, W) uint8 of an RGB uint8 image."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]


def tissue_mask_from_saturation(
    sat: np.ndarray,
    mpp: float,
    saturation_floor: int = 20,
    min_component_um2: float = 20000.0,
    max_hole_um2: float = 40000.0,
) -> np.ndarray:
    """Binary tissue mask (H, W) uint8 in {0, 1} from HSV saturation at `mpp` µm/px.

    Saturation separates stained tissue from white/grey glass; Otsu adapts to the stain, the
    floor stops it from splitting pure background into two classes on slides without tissue.
    """
    px_area = mpp * mpp  # µm² per mask pixel
    k = min(odd_px(MEDIAN_UM / mpp), max(1, (min(sat.shape) - 1) | 1))  # no wider than the mask
    # Every step writes into one of two uint8 buffers: memory stays ~2 bytes per mask pixel.
    blurred = cv2.medianBlur(sat, k)
    otsu = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
    thr = max(float(otsu), float(saturation_floor))
    mask = cv2.threshold(blurred, thr, 1, cv2.THRESH_BINARY, dst=blurred)[1]  # (H, W) uint8 {0, 1}
    # Close small gaps between nuclei / stroma fibres.
    c = odd_px(CLOSE_UM / mpp)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (c, c))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, dst=mask)
    return _clean_components(mask, min_component_um2 / px_area, max_hole_um2 / px_area)


def _clean_components(mask: np.ndarray, min_area_px: float, max_hole_px: float) -> np.ndarray:
    """Fill holes smaller than `max_hole_px` and drop tissue pieces smaller than `min_area_px`.

    Works on contours (a two-level hierarchy: outer boundaries and their holes), not on label
    images, so memory stays one byte per mask pixel on huge slides.
    """
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return mask
    out = mask  # edited in place: the caller's buffer is ours
    hier = hierarchy[0]  # (K, 4): next, previous, first child, parent
    holes = [i for i in range(len(contours)) if hier[i][3] >= 0]
    small_holes = [contours[i] for i in holes if cv2.contourArea(contours[i]) < max_hole_px]
    if small_holes:
        cv2.drawContours(out, small_holes, -1, 1, thickness=cv2.FILLED)
    outer = [i for i in range(len(contours)) if hier[i][3] < 0]
    # a piece's area = its outline's area minus the holes left open inside it
    tiny = []
    for i in outer:
        area = cv2.contourArea(contours[i]) + 1  # +1: single-pixel specks have zero polygon area
        child = hier[i][2]
        while child >= 0:
            if cv2.contourArea(contours[child]) >= max_hole_px:
                area -= cv2.contourArea(contours[child])
            child = hier[child][0]
        if area < min_area_px:
            tiny.append(contours[i])
    if tiny:
        cv2.drawContours(out, tiny, -1, 0, thickness=cv2.FILLED)  # islands in holes are top-level too
    return out
