"""The files of a slide, before any reader decodes them: which files, their fingerprint, and
refusals of files no reader should be trusted with (truncated or damaged TIFFs, non-brightfield
images, declared sizes no file of that many bytes can hold)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import SlideError

FINGERPRINT_BYTES = 1 << 20  # hashed from the head and the tail of every file of a slide
FINGERPRINT_BLOCKS = 64  # blocks sampled evenly between head and tail ...
FINGERPRINT_BLOCK_BYTES = 64 << 10  # ... of this many bytes each (6 MiB read per file in all)
# A real slide stores at least one byte per this many level-0 pixels: JPEG needs >= 1 byte per
# ~40-64 px even for blank tiles, deflate ~300, zstd on blank 1024-px tiles ~7,500; tissue takes
# far more. A TIFF declaring more pixels than that is forged or damaged (its reads would take hours).
MAX_PIXELS_PER_BYTE = 100_000


def slide_files(path: str | Path) -> list[Path]:
    """The files that make up a slide: one file, every file of a folder (DICOM), or a MIRAX
    index file plus its data folder of the same name."""
    p = Path(path)
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    data = p.with_suffix("")
    if p.suffix.lower() == ".mrxs" and data.is_dir():
        return [p] + sorted(f for f in data.rglob("*") if f.is_file())
    return [p]


def _sample_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes a fingerprint reads: the whole file when small, else the
    head, the tail and FINGERPRINT_BLOCKS blocks evenly spaced between them."""
    sampled = 2 * FINGERPRINT_BYTES + FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK_BYTES
    if size <= sampled:
        return [(0, size)]
    spans = [(0, FINGERPRINT_BYTES)]
    inner, step = size - 2 * FINGERPRINT_BYTES, (size - 2 * FINGERPRINT_BYTES) / FINGERPRINT_BLOCKS
    for i in range(FINGERPRINT_BLOCKS):
        off = FINGERPRINT_BYTES + int(i * step + (step - FINGERPRINT_BLOCK_BYTES) / 2)
        spans.append((off, min(FINGERPRINT_BLOCK_BYTES, FINGERPRINT_BYTES + inner - off)))
    spans.append((size - FINGERPRINT_BYTES, FINGERPRINT_BYTES))
    return spans


def fingerprint(path: str | Path) -> str:
    """sha256 over name, size, mtime (whole seconds) and sampled bytes of every file of the slide.

    The mtime catches an edit anywhere in the file (an in-place rewrite of a few tiles changes
    no size); the bytes (whole file up to ~6 MiB, else head, tail and 64 evenly spaced 64-KiB
    blocks) catch a different file copied over it with its mtime kept. 6 MiB read per file: a
    few milliseconds on a 3 GB slide (bench/fingerprint.py). A copy that keeps mtimes (cp -p,
    rsync -a) keeps the fingerprint; `touch` changes it (as it makes Snakemake rerun).
    """
    h = hashlib.sha256()
    for f in slide_files(path):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        with open(f, "rb") as fh:
            for off, n in _sample_spans(st.st_size):
                fh.seek(off)
                h.update(fh.read(n))
    return h.hexdigest()


def legacy_fingerprint(path: str | Path) -> str:
    """The fingerprint of stores written before mtime and sampled blocks were added (size, head
    and tail only): still accepted for those, so an upgrade does not make every store stale."""
    h = hashlib.sha256()
    for f in slide_files(path):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            if size > FINGERPRINT_BYTES:
                fh.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
                h.update(fh.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def fingerprint_matches(path: str | Path, recorded: str | None, current: str | None = None) -> bool:
    """Whether the slide at `path` is the one a store recorded (`current`: its fingerprint if
    already computed). Raises OSError when the slide cannot be read."""
    if not recorded:
        return False
    if (current or fingerprint(path)) == recorded:
        return True
    return legacy_fingerprint(path) == recorded


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
    the file), and images that are not 8-bit RGB (fluorescence, 16-bit, multi-channel)."""
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
    if dtype != np.uint8 or samples not in (3, 4) or not axes or axes[-1] != "S":
        raise SlideError(
            path.name,
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
