"""`open_slide(path, mpp=None)`: the one way the pipeline opens a slide.

Readers are tried in the order of `READERS`: DICOM first (a folder, or a file marked "DICM", both
read through OpenSlide), then OpenSlide (vendor formats and tiled TIFFs), then tifffile (TIFFs
OpenSlide refuses). A reader returns None for a format that is not its own, raises
`ReaderRefused` for one it knows but cannot decode (the next reader gets it), and raises
`SlideError` when the slide is unusable whoever reads it (e.g. its magnification is unknown).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import SlideError
from pipeline.slides.base import ReaderRefused, Slide
from pipeline.slides.checks import check_declared_size, check_tiff
from pipeline.slides.dicom import open_dicom
from pipeline.slides.openslide_reader import open_openslide
from pipeline.slides.tiff_reader import open_tifffile

Opener = Callable[[Path, "float | None"], "Slide | None"]  # (path, mpp override) -> Slide or None

READERS: dict[str, Opener] = {
    "dicom": open_dicom,
    "openslide": open_openslide,
    "tifffile": open_tifffile,
}


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a slide with the first reader of `READERS` that can; `mpp` overrides the metadata (µm/px).

    Whatever a damaged file makes the readers raise becomes a SlideError with one line."""
    p = Path(path)
    if not p.exists():
        raise SlideError(p.name, f"file not found: {p}")
    if not os.access(p, os.R_OK):
        raise SlideError(p.name, f"file not readable: {p}")
    try:
        check_tiff(p)
        slide = _first_reader(p, mpp)
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


def _first_reader(p: Path, mpp: float | None) -> Slide:
    refusals: list[str] = []
    for name, opener in READERS.items():
        try:
            slide = opener(p, mpp)
        except ReaderRefused as e:
            refusals.append(f"{name}: {e}")
            continue
        if slide is not None:
            return slide
    if p.is_dir():
        raise SlideError(p.name, "folder holds no DICOM whole-slide image (a folder is read as one DICOM series)")
    others = [n for n in READERS if not any(r.startswith(f"{n}: ") for r in refusals)]
    why = "; ".join(refusals + ([f"{', '.join(others)}: not their format"] if others else []))
    raise SlideError(p.name, f"no reader can open it ({why})")
