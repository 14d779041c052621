"""Slide reading: OpenSlide for vendor formats, tifffile (lazily, via zarr) for TIFFs it refuses.

`open_slide(path, mpp=None)` resolves the scan resolution from real metadata and returns a
`Slide` whose `read(x0, y0, size, mpp)` gives an RGB uint8 tile at any coarser µm/px.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import SlideError
from pipeline.slide_files import (  # noqa: F401 - fingerprints are part of this module's API
    check_declared_size,
    check_tiff,
    fingerprint,
    fingerprint_matches,
    slide_files,
)

PLAUSIBLE_MPP = (0.05, 20.0)  # µm/px a resolution tag may claim and still be a scan resolution
_UNIT_TO_UM = {"centimeter": 1e4, "inch": 25400.0}


@dataclass
class SlideInfo:
    """What the pipeline records about a slide: geometry, vendor and where its mpp came from."""

    path: str
    backend: str  # "openslide" or "tifffile"
    vendor: str
    width: int  # level-0 size (px)
    height: int
    mpp: float  # level-0 µm/px
    mpp_source: str  # "override", "openslide", "tiff-resolution" or "objective-power"
    level_downsamples: list[float] = field(default_factory=list)
    level_dimensions: list[tuple[int, int]] = field(default_factory=list)


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied) over white -> RGB uint8; transparent = outside the scanned area."""
    rgb = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # a contiguous copy, ~15x faster than numpy's strided one
    a = rgba[..., 3]
    if a.min() < 255:  # blend only the see-through pixels: no full-size float copies
        see_through = a < 255
        af = a[see_through].astype(np.float32)[:, None] / 255.0  # (K, 1)
        rgb[see_through] = (rgb[see_through] * af + 255.0 * (1.0 - af) + 0.5).astype(np.uint8)
    return rgb


class Slide:
    """A whole-slide image with a resolved base mpp; subclasses implement `_read_level`."""

    info: SlideInfo

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) from `level`, (x, y) in that level's pixels; outside = white."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return Path(self.info.path).name

    def best_level(self, downsample: float) -> int:
        """Index of the level with the largest downsample not above `downsample`."""
        ds = self.info.level_downsamples
        ok = [i for i, d in enumerate(ds) if d <= downsample * (1 + 1e-3)]
        return max(ok, key=lambda i: ds[i]) if ok else 0

    def read(self, x0: int, y0: int, size: int, mpp: float) -> np.ndarray:
        """RGB uint8 (size, size, 3) tile whose top-left is level-0 (x0, y0), at `mpp` µm/px."""
        return self.read_rect(x0, y0, size, size, mpp)

    def read_rect(self, x0: float, y0: float, w: int, h: int, mpp: float) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `mpp` µm/px from the best pyramid level, area-resized."""
        ds = mpp / self.info.mpp
        level = self.best_level(ds)
        lds = self.info.level_downsamples[level]
        lx, ly = int(round(x0 / lds)), int(round(y0 / lds))
        lw = max(1, int(round(w * ds / lds)))
        lh = max(1, int(round(h * ds / lds)))
        try:
            img = self._read_level(level, lx, ly, lw, lh)
        except SlideError:
            raise
        except Exception as e:  # decoder errors name the tile, not a traceback
            raise SlideError(self.name, f"cannot read tile at level-0 ({int(x0)}, {int(y0)}): {e}") from e
        if (lw, lh) != (w, h):
            interp = cv2.INTER_AREA if lw >= w else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        return img

    def thumbnail(self, mpp: float, max_read_pixels: int = 4_000_000) -> np.ndarray:
        """The whole slide at `mpp` µm/px, read in blocks so no read exceeds `max_read_pixels`.

        Pixel (i, j) of the result covers level-0 [j*s, (j+1)*s) x [i*s, (i+1)*s), s = mpp / base mpp.
        To reduce blocks as they come (e.g. to saturation), iterate `thumbnail_blocks` instead.
        """
        out = np.empty((*self.thumbnail_shape(mpp), 3), np.uint8)
        for by, bx, img in self.thumbnail_blocks(mpp, max_read_pixels):
            out[by : by + img.shape[0], bx : bx + img.shape[1]] = img
        return out

    def thumbnail_shape(self, mpp: float) -> tuple[int, int]:
        """(h, w) of `thumbnail(mpp)`: the slide's level-0 size over mpp / base mpp, rounded up."""
        s = mpp / self.info.mpp
        return max(1, math.ceil(self.info.height / s)), max(1, math.ceil(self.info.width / s))

    def thumbnail_blocks(self, mpp: float, max_read_pixels: int = 4_000_000, align: int = 1):
        """Yield (y, x, RGB block) tiling `thumbnail(mpp)`, one pyramid read per block.

        Blocks are read from the best level (the largest downsample not above mpp / base mpp)
        and area-resized only when that level is not already at `mpp`; their sides are
        multiples of `align` (but the last row/column), so a caller may reduce them further by
        that factor without seams. The last row/col may run past the slide; that part is white.
        """
        s = mpp / self.info.mpp
        out_h, out_w = self.thumbnail_shape(mpp)
        level = self.best_level(s)
        lds = self.info.level_downsamples[level]
        r = s / lds  # level pixels per output pixel (>= 1 up to rounding)
        block = max(16, int(math.sqrt(max_read_pixels) / max(r, 1.0)))  # output px per block side
        block = max(align, block // align * align)
        for by in range(0, out_h, block):
            for bx in range(0, out_w, block):
                bh, bw = min(block, out_h - by), min(block, out_w - bx)
                lx0, ly0 = int(round(bx * r)), int(round(by * r))
                lx1, ly1 = int(round((bx + bw) * r)), int(round((by + bh) * r))
                try:
                    img = self._read_level(level, lx0, ly0, max(1, lx1 - lx0), max(1, ly1 - ly0))
                except Exception as e:
                    raise SlideError(self.name, f"cannot read level {level} near ({lx0}, {ly0}): {e}") from e
                if img.shape[:2] != (bh, bw):
                    interp = cv2.INTER_AREA if img.shape[1] >= bw else cv2.INTER_LINEAR
                    img = cv2.resize(img, (bw, bh), interpolation=interp)
                yield by, bx, img


class OpenSlideSlide(Slide):
    """Any format OpenSlide reads: SVS, NDPI, MRXS, DICOM, generic tiled TIFF, ..."""

    def __init__(self, osr, info: SlideInfo, target: Path):
        self._osr = osr
        self.info = info
        self._target = target  # the file OpenSlide opened (one file of a DICOM folder)

    def _read_level(self, level, x, y, w, h):
        import openslide

        lds = self.info.level_downsamples[level]
        try:
            region = self._osr.read_region((int(round(x * lds)), int(round(y * lds))), level, (w, h))
        except openslide.OpenSlideError:
            # OpenSlide errors are sticky: after one undecodable tile the handle fails every
            # later read. A fresh handle keeps the failure to this tile.
            self._reopen()
            raise
        return _composite_white(np.asarray(region))

    def _reopen(self) -> None:
        import openslide

        with contextlib.suppress(Exception):
            self._osr.close()
        self._osr = openslide.OpenSlide(str(self._target))

    def close(self):
        self._osr.close()


class TiffSlide(Slide):
    """TIFFs OpenSlide refuses (stripped, OME pyramids), read lazily through tifffile's zarr store."""

    def __init__(self, tif, levels, info: SlideInfo):
        self._tif = tif
        self._levels = levels  # zarr arrays (H, W, C) uint8, finest first
        self.info = info

    def _read_level(self, level, x, y, w, h):
        arr = self._levels[level]
        H, W = arr.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            tile = np.asarray(arr[y0:y1, x0:x1])
            if tile.ndim == 2:
                tile = np.repeat(tile[..., None], 3, axis=2)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[..., :3]
        return out

    def close(self):
        self._tif.close()


def _tag_mpp(unit: str | None, xres: float | None, yres: float | None) -> float | None:
    """µm/px from TIFF resolution tags, or None when the unit is not physical."""
    if not unit or not xres or str(unit).lower() not in _UNIT_TO_UM:
        return None
    scale = _UNIT_TO_UM[str(unit).lower()]
    vals = [scale / float(r) for r in (xres, yres) if r]
    return float(np.mean(vals)) if vals else None


def resolve_mpp(name: str, override: float | None, candidates: list[tuple[str, float | None]]) -> tuple[float, str]:
    """The base µm/px and its source, in the documented order; one clear error when none is usable."""
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


def _dicom_series_file(folder: Path) -> Path | None:
    """One file of the folder's only DICOM WSI series; several series is an error (which one?)."""
    import openslide

    series: dict[str, Path] = {}
    for f in sorted(folder.glob("*.dcm")):
        try:
            with openslide.OpenSlide(str(f)) as osr:
                uid = osr.properties.get("dicom.SeriesInstanceUID", str(f))
        except openslide.OpenSlideError:
            continue  # not a whole-slide image instance (e.g. a stray non-WSI DICOM)
        series.setdefault(uid, f)
    if len(series) > 1:
        files = ", ".join(p.name for p in series.values())
        raise SlideError(folder.name, f"folder holds {len(series)} DICOM series (first files: {files}); "
                                      "point the sheet's path at one file of the series to use")
    return next(iter(series.values()), None)


def _open_with_openslide(path: Path, override: float | None) -> Slide | None:
    import openslide

    target = path
    if path.is_dir():  # a DICOM folder: OpenSlide opens one file and finds the series' other files
        target = _dicom_series_file(path)
        if target is None:
            return None
    try:
        osr = openslide.OpenSlide(str(target))
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as e:
        if path.is_dir():
            raise SlideError(path.name, f"OpenSlide cannot open it: {e}") from e
        raise _Refused(str(e)) from e  # a TIFF OpenSlide cannot decode may still suit tifffile
    props = osr.properties
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    def num(key):
        try:
            return float(props[key])
        except (KeyError, ValueError):
            return None

    mx, my = num(openslide.PROPERTY_NAME_MPP_X), num(openslide.PROPERTY_NAME_MPP_Y)
    os_mpp = float(np.mean([v for v in (mx, my) if v])) if (mx or my) else None
    tag = _tag_mpp(props.get("tiff.ResolutionUnit"), num("tiff.XResolution"), num("tiff.YResolution"))
    power = num(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    candidates: list[tuple[str, float | None]] = []
    if vendor == "generic-tiff":  # OpenSlide's mpp here IS the TIFF tag: check it as one
        candidates.append(("tiff-resolution", tag if tag is not None else os_mpp))
    else:
        candidates += [("openslide", os_mpp), ("tiff-resolution", tag)]
    candidates.append(("objective-power", 10.0 / power if power else None))
    try:
        mpp, source = resolve_mpp(path.name, override, candidates)
    except SlideError:
        osr.close()
        raise
    W, H = osr.dimensions
    info = SlideInfo(
        path=str(path), backend="openslide", vendor=vendor, width=W, height=H, mpp=mpp,
        mpp_source=source, level_downsamples=[float(d) for d in osr.level_downsamples],
        level_dimensions=[tuple(d) for d in osr.level_dimensions],
    )
    return OpenSlideSlide(osr, info, Path(target))


class _Refused(Exception):
    """OpenSlide recognised the file but cannot read it (e.g. an unsupported TIFF compression)."""


def _open_with_tifffile(path: Path, override: float | None, openslide_error: str | None = None) -> Slide:
    import tifffile
    import zarr

    def refuse(e: Exception) -> SlideError:
        if openslide_error:
            return SlideError(path.name, f"OpenSlide cannot open it ({openslide_error}) and tifffile cannot decode it ({e})")
        return SlideError(path.name, f"neither OpenSlide nor tifffile can open it: {type(e).__name__}: {e}")

    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as e:
        raise refuse(e) from e
    try:
        series = tif.series[0]
        page = series.pages[0]
        store = tif.aszarr(series=0, level=None)
        root = zarr.open(store, mode="r")
        levels = [root[k] for k in sorted(root.array_keys(), key=int)] if hasattr(root, "array_keys") else [root]
        tags = page.tags
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else None
        unit_name = {2: "inch", 3: "centimeter"}.get(int(unit), None) if unit is not None else None
        res = [tags[k].value for k in ("XResolution", "YResolution") if k in tags]
        xres, yres = [(r[0] / r[1]) if isinstance(r, tuple) and r[1] else None for r in res] + [None] * (2 - len(res))
        candidates = [("tiff-resolution", _tag_mpp(unit_name, xres, yres))]
        try:  # decode one pixel of the smallest level: an unknown codec fails here, not mid-cohort
            np.asarray(levels[-1][:1, :1])
        except Exception as e:
            raise refuse(e) from e
        mpp, source = resolve_mpp(path.name, override, candidates)
    except SlideError:
        tif.close()
        raise
    except Exception as e:
        tif.close()
        raise refuse(e) from e
    H, W = levels[0].shape[:2]
    info = SlideInfo(
        path=str(path), backend="tifffile", vendor="tiff", width=int(W), height=int(H), mpp=mpp,
        mpp_source=source, level_downsamples=[W / lv.shape[1] for lv in levels],
        level_dimensions=[(int(lv.shape[1]), int(lv.shape[0])) for lv in levels],
    )
    return TiffSlide(tif, levels, info)


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide with OpenSlide, else tifffile; `mpp` overrides the metadata (µm/px).

    Whatever a damaged file makes the readers raise becomes a SlideError with one line."""
    p = Path(path)
    if not p.exists():
        raise SlideError(p.name, f"file not found: {p}")
    if not os.access(p, os.R_OK):
        raise SlideError(p.name, f"file not readable: {p}")
    try:
        slide = _open(p, mpp)
    except SlideError:
        raise
    except Exception as e:  # a reader choking on a damaged file: one line, never a traceback
        raise SlideError(p.name, f"cannot open it: {type(e).__name__}: {e}") from e
    try:
        check_declared_size(p, slide.info.width, slide.info.height)
    except BaseException:
        slide.close()
        raise
    return slide


def _open(p: Path, mpp: float | None) -> Slide:
    check_tiff(p)
    try:
        slide = _open_with_openslide(p, mpp)
    except _Refused as e:
        return _open_with_tifffile(p, mpp, openslide_error=str(e))
    if slide is not None:
        return slide
    if p.is_dir():
        raise SlideError(p.name, "folder holds no slide OpenSlide can read")
    return _open_with_tifffile(p, mpp)
