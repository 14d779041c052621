"""Typed configuration of the tiling stage, read from the `tiling:` block of config.yaml."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


def checked_options(cls, d: dict[str, Any] | None, section: str) -> dict[str, Any]:
    """`d` without None values; unknown keys of the dataclass `cls` are a clear error."""
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"{section}: expected a mapping of options, got {type(d).__name__} {d!r}")
    d = {k: v for k, v in (d or {}).items() if v is not None}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown option(s) {unknown}; known: {sorted(known)}")
    return d


def json_options(text: str | None, option: str) -> dict[str, Any] | None:
    """A CLI option given as a JSON object (`--tiling '{"tile_size": 512}'`), or a one-line error."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{option}: not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: expected a JSON object like '{{\"key\": value}}', got {text!r}")
    return value


# (kind, lowest, highest, lowest excluded) per option, as in workflow/schemas/config.schema.yaml
# (tests/test_bad_input.py checks that both accept and refuse the same values)
_TILING_BOUNDS: dict[str, tuple[str, float | None, float | None, bool]] = {
    "tile_size": ("integer", 16, 4096, False),
    "tissue_threshold": ("number", 0, 1, False),
    "mask_mpp": ("number", 0, None, True),
    "mask_max_side": ("integer", 64, None, False),
    "mpp_tolerance": ("number", 0, None, False),
    "allow_upsample": ("boolean", None, None, False),
    "saturation_floor": ("integer", 0, 255, False),
    "min_component_um2": ("number", 0, None, False),
    "max_hole_um2": ("number", 0, None, False),
    "max_read_pixels": ("integer", 65536, None, False),
}


def check_value(section: str, name: str, value: Any, kind: str, lo: float | None = None,
                hi: float | None = None, lo_excluded: bool = False) -> None:
    """Raise a one-line ConfigError unless `value` is a JSON-schema `kind` within the bounds."""
    ok_type = {
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool)
        or isinstance(value, float) and value.is_integer(),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
    }[kind]
    if not ok_type:
        raise ConfigError(f"{section}.{name} must be {'a' if kind != 'integer' else 'an'} {kind}, got {value!r}")
    if kind == "boolean":
        return
    if lo is not None and (value <= lo if lo_excluded else value < lo):
        raise ConfigError(f"{section}.{name} must be {'>' if lo_excluded else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{section}.{name} must be <= {hi:g}, got {value!r}")


def check_model_options(d: dict[str, Any] | None) -> None:
    """Check `training.model` against ModelConfig (keys and values) without importing torch:
    the workflow calls this when it parses the config, so a typo fails before any job runs."""
    path = Path(__file__).parent / "mil" / "models" / "config.py"
    name = "pipeline._model_config_standalone"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while building the class
        spec.loader.exec_module(module)
    try:
        module.ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config training.model: {e}") from None


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
        for name, (kind, lo, hi, lo_excluded) in _TILING_BOUNDS.items():
            check_value("tiling", name, getattr(self, name), kind, lo, hi, lo_excluded)
            if kind == "integer":
                object.__setattr__(self, name, int(getattr(self, name)))
        if not isinstance(self.magnifications, dict):
            raise ConfigError(f"tiling.magnifications must be a mapping name -> µm/px, got {self.magnifications!r}")
        for name, mpp in self.magnifications.items():
            check_value("tiling.magnifications", str(name), mpp, "number", 0, None, True)
        mags = list(self.magnifications.items())
        if not mags:
            raise ConfigError("tiling.magnifications: at least one magnification is required")
        for (_, fine), (name, coarse) in zip(mags, mags[1:]):
            if abs(coarse / fine - 2.0) > 1e-6:
                raise ConfigError(
                    f"tiling.magnifications: {name} must be exactly 2x coarser than the one before it "
                    f"(nested grid), got {fine} -> {coarse} µm/px"
                )
        if not 0.0 <= self.tissue_threshold <= 1.0:
            raise ConfigError(f"tiling.tissue_threshold must be in [0, 1], got {self.tissue_threshold}")
        if self.tile_size < 16:
            raise ConfigError(f"tiling.tile_size must be >= 16, got {self.tile_size}")

    @property
    def mag_names(self) -> list[str]:
        return list(self.magnifications)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TilingConfig:
        d = checked_options(cls, d, "tiling")
        if "magnifications" in d:
            mags = d["magnifications"]
            if not isinstance(mags, dict):
                raise ConfigError(f"tiling.magnifications must be a mapping name -> µm/px, got {mags!r}")
            for name, mpp in mags.items():
                check_value("tiling.magnifications", str(name), mpp, "number", 0, None, True)
            mags = sorted(mags.items(), key=lambda kv: float(kv[1]))  # finest first
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
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config {path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path}: top level must be a mapping")
    return cfg
