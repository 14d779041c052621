"""A slide's scan resolution (µm/px at level 0) from what its metadata offers, in one documented
order: the sheet's override, then each reader's candidates in the order it lists them (OpenSlide's
own mpp, the TIFF resolution tags, the objective power as 10 / power)."""

from __future__ import annotations

import math

import numpy as np

from pipeline.errors import SlideError

PLAUSIBLE_MPP = (0.05, 20.0)  # µm/px a resolution tag may claim and still be a scan resolution
UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}


def tag_mpp(unit: str | None, xres: float | None, yres: float | None) -> float | None:
    """µm/px from TIFF resolution tags, or None when the unit is not physical."""
    if not unit or not xres or str(unit).lower() not in UNIT_TO_UM:
        return None
    scale = UNIT_TO_UM[str(unit).lower()]
    vals = [scale / float(r) for r in (xres, yres) if r]
    return float(np.mean(vals)) if vals else None


def resolve_mpp(name: str, override: float | None, candidates: list[tuple[str, float | None]]) -> tuple[float, str]:
    """The base µm/px and its source, in the documented order; one clear error when none is usable.

    A TIFF resolution tag outside PLAUSIBLE_MPP (e.g. 72 dpi = 352.8 µm/px, a screen default)
    is not taken for a scan resolution."""
    if override is not None:
        if not (override > 0 and math.isfinite(override)):
            raise SlideError(name, f"mpp override must be a positive number, got {override}")
        return float(override), "override"
    rejected = []
    for source, value in candidates:
        if value is None or not math.isfinite(value) or value <= 0:
            continue
        if source == "tiff-resolution" and not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
            rejected.append(f"its resolution tag says {value:.4g} µm/px, which is not a scan resolution")
            continue
        return float(value), source
    why = "; ".join(rejected) if rejected else "no MPP, resolution tag or objective power in its metadata"
    raise SlideError(name, f"magnification unknown: {why}; add an 'mpp' column (µm/px) for it in the slide sheet")
