"""The files of a slide, before any reader decodes them: which files make it up and their
fingerprint (how a store knows the slide it was made from is still the same)."""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_BYTES = 1 << 20  # hashed from the head and the tail of every file of a slide
FINGERPRINT_BLOCKS = 64  # blocks sampled evenly between head and tail ...
FINGERPRINT_BLOCK_BYTES = 64 << 10  # ... of this many bytes each (6 MiB read per file in all)


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
