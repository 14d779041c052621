"""Cost of the integrity checks (issue 14), as ratios measured in one run.

1. Slide fingerprint on a big file made on the fly (default 3 GB of random bytes): the sampled
   fingerprint (name, size, mtime, head, tail, 64 blocks of 64 KiB) against the old one (size,
   head, tail) and a full sha256, with the file dropped from the page cache first (cold) and
   read again (warm).
2. Feature chunks: decoding a feature array (float16, Blosc LZ4 bit-shuffled, as extraction
   writes it) with and without the crc32c codec, and the non-finite check at load, against the
   decode alone; writing with and without crc32c.

    python bench/integrity.py [--gb 3] [--dir /tmp] [--rows 20000 --dim 1024]

Prints `name: value` lines and the ratios; the big file is deleted afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.slides.files import fingerprint, legacy_fingerprint  # noqa: E402
from pipeline.store import (  # noqa: E402
    CHECKSUM_CODEC,
    FEATURE_CODEC,
    nonfinite_rows,
    zarr_io,  # noqa: E402
)

PIECE = 64 << 20


def make_file(path: Path, nbytes: int, seed: int = 0) -> None:
    """`nbytes` of pseudo-random bytes (incompressible, like JPEG tiles), flushed to disk."""
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = nbytes
        while left:
            n = min(PIECE, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (no root needed for a clean file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def full_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def timed(fn, *args, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_fingerprint(folder: Path, gb: float) -> dict[str, float]:
    path = folder / "integrity-bench.bin"
    nbytes = int(gb * (1 << 30))
    t0 = time.perf_counter()
    make_file(path, nbytes)
    out = {"file_gb": nbytes / (1 << 30), "make_s": time.perf_counter() - t0}
    try:
        for name, fn in (("legacy", legacy_fingerprint), ("sampled", fingerprint), ("full_sha256", full_sha256)):
            drop_cache(path)
            out[f"{name}_cold_s"] = timed(fn, path)
            out[f"{name}_warm_s"] = timed(fn, path, repeat=3)
    finally:
        path.unlink(missing_ok=True)
    return out


def bench_chunks(folder: Path, rows: int, dim: int, chunk_rows: int = 1024) -> dict[str, float]:
    import zarr

    rng = np.random.default_rng(1)
    feats = np.maximum(rng.standard_normal((rows, dim)), 0).astype(np.float16)  # ReLU-like
    out: dict[str, float] = {"rows": rows, "dim": dim, "raw_mb": feats.nbytes / 1e6}
    for name, codecs in (("plain", [FEATURE_CODEC]), ("crc32c", [FEATURE_CODEC, CHECKSUM_CODEC])):
        path = folder / f"{name}.zarr"
        shutil.rmtree(path, ignore_errors=True)

        def write(path=path, codecs=codecs):
            shutil.rmtree(path, ignore_errors=True)
            arr = zarr.create_array(str(path), shape=feats.shape, dtype=feats.dtype, chunks=(chunk_rows, dim),
                                    compressors=codecs)
            arr[...] = feats

        out[f"write_{name}_s"] = timed(write, repeat=3)
        out[f"read_{name}_s"] = timed(zarr_io.read_array, path, repeat=5)
        assert np.array_equal(zarr_io.read_array(path), feats)
    out["nonfinite_check_s"] = timed(nonfinite_rows, feats, repeat=5)
    out["isfinite_check_s"] = timed(lambda: ~np.isfinite(feats).all(1), repeat=5)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.0, help="size of the file fingerprinted (GiB)")
    ap.add_argument("--dir", default=None, help="folder for the big file (default: the temp folder)")
    ap.add_argument("--rows", type=int, default=20000, help="feature rows (tiles of one slide)")
    ap.add_argument("--dim", type=int, default=1024, help="feature dimension (UNI: 1024)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        fp = bench_fingerprint(Path(tmp), args.gb)
        ch = bench_chunks(Path(tmp), args.rows, args.dim)
    for k, v in {**fp, **ch}.items():
        print(f"{k}: {v:.4g}")
    print(f"ratio sampled/legacy fingerprint (cold): {fp['sampled_cold_s'] / fp['legacy_cold_s']:.2f}")
    print(f"ratio sampled fingerprint / full sha256 (cold): {fp['sampled_cold_s'] / fp['full_sha256_cold_s']:.4f}")
    print(f"ratio read with crc32c / without: {ch['read_crc32c_s'] / ch['read_plain_s']:.3f}")
    print(f"ratio write with crc32c / without: {ch['write_crc32c_s'] / ch['write_plain_s']:.3f}")
    print(f"ratio non-finite check / read: {ch['nonfinite_check_s'] / ch['read_crc32c_s']:.3f}")
    print(f"ratio np.isfinite / exponent-bit check: {ch['isfinite_check_s'] / ch['nonfinite_check_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
