"""The OpenSlide reader: every vendor format OpenSlide reads (SVS, NDPI, MRXS, SCN, generic tiled
TIFF, DICOM via `pipeline.slides.dicom`)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from pipeline.errors import SlideError
from pipeline.slides.base import ReaderRefused, Slide, SlideInfo, composite_white
from pipeline.slides.mpp import resolve_mpp, tag_mpp


class OpenSlideSlide(Slide):
    """A slide read through an OpenSlide handle."""

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
        return composite_white(np.asarray(region))

    def _reopen(self) -> None:
        import openslide

        with contextlib.suppress(Exception):  # the handle is already failing; the reopen is what counts
            self._osr.close()
        self._osr = openslide.OpenSlide(str(self._target))

    def close(self):
        self._osr.close()


def from_handle(osr, path: Path, target: Path, override: float | None) -> OpenSlideSlide:
    """The Slide of an open OpenSlide handle: base mpp resolved from its properties (closed on error)."""
    import openslide

    props = osr.properties
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    def num(key):
        try:
            return float(props[key])
        except (KeyError, ValueError):
            return None

    mx, my = num(openslide.PROPERTY_NAME_MPP_X), num(openslide.PROPERTY_NAME_MPP_Y)
    os_mpp = float(np.mean([v for v in (mx, my) if v])) if (mx or my) else None
    tag = tag_mpp(props.get("tiff.ResolutionUnit"), num("tiff.XResolution"), num("tiff.YResolution"))
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


def open_openslide(path: Path, override: float | None) -> Slide | None:
    """A file OpenSlide reads; None when it does not know the format (folders included);
    ReaderRefused when it knows it but cannot decode it (tifffile may)."""
    import openslide

    if path.is_dir():
        return None
    try:
        osr = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        return None
    except openslide.OpenSlideError as e:
        raise ReaderRefused(str(e)) from e
    return from_handle(osr, path, path, override)
