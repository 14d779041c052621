"""The DICOM reader: a DICOM WSI file, or a folder holding one DICOM WSI series, read through
OpenSlide. Files are recognised by content (the "DICM" marker of the DICOM file format at byte
128), never by extension: converters name them `.dcm`, `.dicom` or nothing at all."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SlideError
from pipeline.slides.base import Slide
from pipeline.slides.openslide_reader import from_handle

DICOM_MAGIC_OFFSET = 128  # a 128-byte preamble, then "DICM" (DICOM PS3.10, section 7.1)
DICOM_MAGIC = b"DICM"


def is_dicom(path: Path) -> bool:
    """Whether `path` is a DICOM file (the PS3.10 "DICM" marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(DICOM_MAGIC_OFFSET)
            return fh.read(len(DICOM_MAGIC)) == DICOM_MAGIC
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in `folder` (OpenSlide looks for a series' files there), sorted."""
    return sorted(f for f in folder.iterdir() if f.is_file() and is_dicom(f))


def series_file(folder: Path) -> Path | None:
    """One file of the folder's only DICOM WSI series; None without one; several series is an
    error (which one?)."""
    import openslide

    series: dict[str, Path] = {}
    for f in dicom_files(folder):
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


def open_dicom(path: Path, override: float | None) -> Slide | None:
    """A DICOM WSI file, or a folder of one series (OpenSlide finds the series' other files next
    to the one it opens); None when `path` is neither a DICOM file nor a folder."""
    import openslide

    if path.is_dir():
        target = series_file(path)
        if target is None:
            return None
    elif is_dicom(path):
        target = path
    else:
        return None
    try:
        osr = openslide.OpenSlide(str(target))
    except openslide.OpenSlideError as e:  # a DICOM file only OpenSlide could read
        raise SlideError(path.name, f"OpenSlide cannot open it as a DICOM whole-slide image: {e}") from e
    return from_handle(osr, path, target, override)
