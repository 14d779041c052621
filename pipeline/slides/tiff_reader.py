"""The tifffile reader: TIFFs OpenSlide refuses (stripped, OME pyramids, JPEG 2000 tiles), read
lazily through tifffile's zarr store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import SlideError
from pipeline.slides.base import ReaderRefused, Slide, SlideInfo
from pipeline.slides.mpp import resolve_mpp, tag_mpp


class TiffSlide(Slide):
    """A TIFF read level by level through zarr arrays (only the chunks a read touches are decoded)."""

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


def _refused(e: Exception) -> ReaderRefused:
    return ReaderRefused(f"{type(e).__name__}: {e}")


def open_tifffile(path: Path, override: float | None) -> Slide | None:
    """Any file tifffile can decode (None for folders); ReaderRefused naming tifffile's error when
    it cannot parse the file or decode a pixel of its smallest level (an unknown codec fails
    here, not mid-cohort)."""
    import tifffile
    import zarr

    if path.is_dir():
        return None
    try:
        tif = tifffile.TiffFile(str(path))
    except Exception as e:  # not a TIFF, or one tifffile cannot parse: the factory names it
        raise _refused(e) from e
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
        candidates = [("tiff-resolution", tag_mpp(unit_name, xres, yres))]
        np.asarray(levels[-1][:1, :1])  # decode one pixel of the smallest level
        mpp, source = resolve_mpp(path.name, override, candidates)
    except SlideError:
        tif.close()
        raise
    except Exception as e:  # an undecodable or malformed TIFF: the factory names it
        tif.close()
        raise _refused(e) from e
    H, W = levels[0].shape[:2]
    info = SlideInfo(
        path=str(path), backend="tifffile", vendor="tiff", width=int(W), height=int(H), mpp=mpp,
        mpp_source=source, level_downsamples=[W / lv.shape[1] for lv in levels],
        level_dimensions=[(int(lv.shape[1]), int(lv.shape[0])) for lv in levels],
    )
    return TiffSlide(tif, levels, info)
