"""Typed configuration of the tiling stage, read from the `tiling:` block of config.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import SheetError


def checked_options(cls, d: dict[str, Any] | None, section: str) -> dict[str, Any]:
    """`d` without None values; unknown keys of the dataclass `cls` are a clear error."""
    d = {k: v for k, v in (d or {}).items() if v is not None}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SheetError(f"{section}: unknown option(s) {unknown}; known: {sorted(known)}")
    return d


def _default_mags() -> dict[str, float]:
    return {"20x": 0.5, "10x": 1.0, "5x": 2.0}


@dataclass(frozen=True)
class TilingConfig:
    magnifications: dict[str, float] = field(default_factory=_default_mags)  # name -> target µm/px, finest first, each 2x the previous
    tile_size: int = 256  # tile side in pixels at its own magnification
    tissue_threshold: float = 0.35  # keep a tile when this fraction of its area is tissue
    mask_mpp: float = 16.0  # coarsest mask resolution (µm/px): the mask is the coarsest pyramid level not coarser than this, read as is
    mask_max_side: int = 8192  # cap on the mask's longer side (px): a level longer than this is area-reduced to it
    mpp_tolerance: float = 0.10  # a target may be this much finer than the scan before it is refused
    allow_upsample: bool = False  # tile targets finer than the scan by upsampling (off: refuse)
    saturation_floor: int = 20  # Otsu threshold on HSV saturation never goes below this (0-255)
    min_component_um2: float = 20000.0  # tissue pieces smaller than this area are dropped (µm²)
    max_hole_um2: float = 40000.0  # holes in tissue smaller than this area are filled (µm²)
    max_read_pixels: int = 4_000_000  # largest single region read while masking (px), streams above it

    def __post_init__(self):
        mags = list(self.magnifications.items())
        if not mags:
            raise SheetError("tiling.magnifications: at least one magnification is required")
        for (_, fine), (name, coarse) in zip(mags, mags[1:]):
            if abs(coarse / fine - 2.0) > 1e-6:
                raise SheetError(
                    f"tiling.magnifications: {name} must be exactly 2x coarser than the one before it "
                    f"(nested grid), got {fine} -> {coarse} µm/px"
                )
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise SheetError(f"tiling.tissue_threshold must be in [0, 1], got {self.tissue_threshold}")
        if self.tile_size < 16:
            raise SheetError(f"tiling.tile_size must be >= 16, got {self.tile_size}")

    @property
    def mag_names(self) -> list[str]:
        return list(self.magnifications)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TilingConfig:
        d = checked_options(cls, d, "tiling")
        if "magnifications" in d:
            mags = sorted(d["magnifications"].items(), key=lambda kv: float(kv[1]))  # finest first
            d["magnifications"] = {str(k): float(v) for k, v in mags}
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None) -> dict[str, Any]:
    """The YAML config as a dict ({} when no path is given)."""
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SheetError(f"config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise SheetError(f"config {path}: top level must be a mapping")
    return cfg
