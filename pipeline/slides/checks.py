"""Refusals before any reader decodes a slide: truncated or damaged TIFFs, images that are not
brightfield RGB, and declared sizes no file of that many bytes can hold."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pipeline.errors import SlideError
from pipeline.slides.files import slide_files

# A real slide stores at least one byte per this many level-0 pixels: JPEG needs >= 1 byte per
# ~40-64 px even for blank tiles, deflate ~300, zstd on blank 1024-px tiles ~7,500; tissue takes
# far more. A TIFF declaring more pixels than that is forged or damaged (its reads would take hours).
MAX_PIXELS_PER_BYTE = 100_000

# tifffile's own words for a page chain that runs past the end of the file or into garbage
_TIFF_DAMAGE = ("invalid offset to first page", "invalid page offset", "corrupted tag list",
                "invalid offset to page", "contains no pages")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_tiff(path: Path) -> None:
    """Refuse TIFF-based files that are truncated or damaged (a page or tile data past the end of
    the file), and images that are not brightfield (`check_brightfield`). Files tifffile cannot
    parse at all pass: the readers then give the error."""
    if path.is_dir():
        return
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic[:2] not in (b"II", b"MM"):
        return
    import tifffile

    size = path.stat().st_size
    collect = _Collect()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(collect)
    try:
        with tifffile.TiffFile(str(path)) as tif:
            n_pages = len(tif.pages)  # walks the whole page chain
            for i, page in enumerate(tif.pages):
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                end = int((offsets + counts)[counts > 0].max(initial=0)) if len(offsets) == len(counts) else 0
                if end > size:
                    raise SlideError(path.name, f"file is truncated or damaged: image {i} ({'x'.join(map(str, page.shape))}) "
                                                f"has data up to byte {end:,}, the file ends at byte {size:,}")
            series = tif.series[0] if tif.series else None
            page = series.pages[0] if series is not None else None
            samples = getattr(page, "samplesperpixel", 1)
            dtype, axes, shape = getattr(page, "dtype", None), getattr(series, "axes", ""), getattr(series, "shape", ())
    except SlideError:
        raise
    except Exception:
        return  # not a TIFF tifffile understands; the readers below give the error
    finally:
        tlog.removeHandler(collect)
    damage = [m for m in collect.messages if any(k in m for k in _TIFF_DAMAGE)]
    if damage or n_pages == 0:
        why = damage[0].split("> ", 1)[-1] if damage else "no image in it"
        raise SlideError(path.name, f"file is truncated or damaged: {why} (the file has {size:,} bytes)")
    check_brightfield(path.name, dtype, samples, axes, shape)


def check_brightfield(name: str, dtype, samples: int, axes: str, shape: tuple) -> None:
    """Refuse an image that is not 8-bit RGB(A) with samples last: fluorescence, 16-bit and
    multi-channel images would be read as if they were brightfield colour and tiled as tissue."""
    if dtype != np.uint8 or samples not in (3, 4) or not axes or axes[-1] != "S":
        raise SlideError(
            name,
            f"not a brightfield RGB image ({dtype}, {samples} sample(s)/px, axes {axes}, shape {shape}); "
            "fluorescence, 16-bit and multi-channel images are not supported",
        )


def check_declared_size(path: Path, width: int, height: int) -> None:
    """Refuse a TIFF or DICOM slide whose declared level-0 size cannot fit in its bytes (forged
    or damaged: reading it would decode the same few bytes for hours)."""
    if not path.is_dir():
        with open(path, "rb") as fh:
            if fh.read(2) not in (b"II", b"MM"):
                return  # index files of multi-file formats are small by design
    nbytes = sum(f.stat().st_size for f in slide_files(path))
    pixels = width * height
    if pixels > MAX_PIXELS_PER_BYTE * max(nbytes, 1):
        raise SlideError(path.name, f"declares {width:,} x {height:,} px in {nbytes:,} bytes "
                                    f"({pixels / max(nbytes, 1):,.0f} px per byte; a real slide stores at least one byte "
                                    f"per {MAX_PIXELS_PER_BYTE:,} px): forged or damaged file")
