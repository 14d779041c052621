"""Patch feature extraction: tile store -> feature store, resumable, GPU when present.

Decoding runs in DataLoader workers (each opens its own slide handle) and hands uint8 batches
to the main process, which normalises them on the device and runs the encoder under
`inference_mode` (autocast on CUDA). Rows are written in tile-store order, one committed chunk
at a time, so a killed run resumes from its last chunk and ends byte-identical.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipeline.devices import resolve_device
from pipeline.errors import ConfigError, SlideError
from pipeline.slides import fingerprint_matches, open_slide
from pipeline.store import FeatureStoreMeta, FeatureStoreWriter, read_tile_store

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    batch_size: int = 64  # tiles per encoder call (halved on CUDA out-of-memory)
    num_workers: int = 1  # decoding processes; 0 decodes in the main process
    chunk_batches: int = 16  # batches per committed (resumable) chunk
    device: str = "auto"  # "auto" = CUDA when available, else CPU
    compile: bool = False  # torch.compile the encoder (CUDA; pays off on big cohorts)
    on_tile_error: str = "fail"  # "fail" the slide, or "record" the tile as failed (masked downstream)
    check_slide: bool = True  # refuse when the slide file changed since tiling


class TileDataset(Dataset):
    """Tiles of one magnification as uint8 (S, S, 3) arrays; each worker opens its own slide."""

    def __init__(self, slide_path: str, mpp: float, coords: np.ndarray, tile_mpp: float, size: int):
        self.slide_path, self.mpp, self.coords = slide_path, mpp, coords
        self.tile_mpp, self.size = tile_mpp, size
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.coords)

    def _handle(self):
        if self._slide is None or self._pid != os.getpid():  # one handle per worker process
            self._slide, self._pid = open_slide(self.slide_path, mpp=self.mpp), os.getpid()
        return self._slide

    def __getitem__(self, i: int):
        x, y = (int(v) for v in self.coords[i])
        try:
            img = self._handle().read(x, y, self.size, self.tile_mpp)
            return torch.from_numpy(img), ""
        except SlideError as e:  # reported in-band: the main process decides fail vs record
            return torch.zeros((self.size, self.size, 3), dtype=torch.uint8), e.cause


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (mallopt/malloc_trim), else None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """CPU inference: keep freed memory in the heap instead of handing it back to the kernel.

    A batch allocates and frees GBs of activations (ResNet-18, 64 tiles of 256 px: up to 268 MB
    per tensor). glibc serves blocks that large with a fresh mmap and unmaps them on free, so
    every batch page-faults all of it back in, zero-filled. With mmap off and a high trim
    threshold the same resident pages are reused; peak RSS stays the same (the peak is one
    batch's activations). `bench/private_apis.py`: without it a batch takes 1.32x the CPU time
    (7.8 vs 5.9 s, 738 k vs 19 k minor faults), 2 threads. Process-wide and once; numerics are
    untouched. No-op off glibc. The glibc behaviour is pinned by tests/test_private_apis.py.
    """
    libc = _glibc()
    if libc is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    log.debug("glibc heap keeps freed memory: %s", ok)
    return ok


def trim_heap() -> None:
    """Give free heap pages back to the kernel (glibc). Called before DataLoader workers fork:
    a worker forked from a process holding GBs of resident (free) heap keeps its own copy of
    every page the parent writes next (copy-on-write). `bench/private_apis.py` (ResNet-18, batch
    64): the worker's private memory 903 MiB without the trim, 11 MiB with it; CPU time of the
    next batch within 5 %."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def make_loader(ds: TileDataset, cfg: ExtractConfig, device: torch.device) -> DataLoader:
    """The DataLoader the extractor iterates (also used by bench/extract.py for decode-only).

    Batches are (uint8 (B, S, S, 3), B error strings) from torch's `default_collate`, which in a
    worker stacks the tiles straight into shared memory, so a batch reaches this process
    without another copy (pinned by tests/test_private_apis.py)."""
    if cfg.num_workers > 0:
        trim_heap()  # workers fork at iter(), right after this
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                      collate_fn=default_collate, pin_memory=device.type == "cuda",
                      persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)


class Encoder:
    """The model plus its on-device transform, precision and an OOM-halving batch size."""

    def __init__(self, name: str, weights: str | None, device: torch.device, compile: bool = False):
        from pipeline.features.encoders import build_encoder

        self.model, self.spec = build_encoder(name, weights)
        self.device = device
        if device.type == "cpu":
            keep_freed_memory()
        self.model.to(device)
        self.is_cnn = not hasattr(self.model, "patch_embed")
        if self.is_cnn:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)
        self.sub_batch: int | None = None  # set after the first out-of-memory

    @torch.inference_mode()
    def _run(self, x_uint8: torch.Tensor) -> torch.Tensor:
        x = self.spec.batch_transform(x_uint8.to(self.device, non_blocking=True))  # (B, 3, S, S)
        if self.is_cnn:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.spec.precision):
                y = self.model(x)
        else:
            y = self.model(x)
        return y.float().cpu()  # (B, D)

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        step = self.sub_batch or len(x_uint8)
        out = []
        i = 0
        while i < len(x_uint8):
            try:
                out.append(self._run(x_uint8[i : i + step]))
                i += step
            except torch.OutOfMemoryError:
                if step == 1:
                    raise
                step = max(1, step // 2)
                self.sub_batch = step
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: encoder batch size halved to %d", step)
        return torch.cat(out)


def extract_features(tile_store: str | Path, out: str | Path, encoder: str,
                     weights: str | None | Mapping[str, str | None] = None,
                     slide: str | None = None, mags: list[str] | None = None,
                     cfg: ExtractConfig | None = None, enc: Encoder | None = None) -> dict[str, int]:
    """Extract features of every tile of `mags` (default: all) into the feature store `out`.

    The slide is read at the resolution its tile store recorded (metadata or the sheet's
    override, resolved once at tiling); `slide` only relocates a moved file, checked by its
    fingerprint. `weights`: one file for every magnification, or magnification -> file (each its
    own model, e.g. DSMIL's multiscale embedders or per-magnification SimCLR); the store then
    records the weights' sha256 (and `pretrained`) per magnification.
    """
    cfg = cfg or ExtractConfig()
    ts = read_tile_store(tile_store)
    meta = ts.meta
    slide_id = meta.slide_id
    slide_path = slide or meta.slide_path
    if cfg.check_slide:
        try:
            same = fingerprint_matches(slide_path, meta.slide_fingerprint)
        except OSError as e:
            raise SlideError(slide_id, f"cannot read the slide file {slide_path}: {e}") from e
        if not same:
            raise SlideError(slide_id, f"slide file changed since tiling ({slide_path}); re-run tiling")
    mags = mags or list(ts.tiles)
    unknown = [m for m in mags if m not in ts.tiles]
    if unknown:
        raise SlideError(slide_id, f"magnification(s) {unknown} not in the tile store {tile_store}")
    device = resolve_device(cfg.device)
    per_mag = dict(weights) if isinstance(weights, Mapping) else {m: weights for m in mags}
    missing = [m for m in mags if m not in per_mag]
    if missing:
        raise ConfigError(f"weights given per magnification, but none for {', '.join(missing)}")
    encs: dict[str, Encoder] = {}
    by_file: dict[str | None, Encoder] = {}
    for m in mags:
        w = per_mag[m]
        if w not in by_file:
            by_file[w] = enc or Encoder(encoder, w, device, cfg.compile)
        encs[m] = by_file[w]
    enc = encs[mags[0]]
    spec = enc.spec.attrs()
    if len(by_file) > 1:  # one model per magnification: its weights recorded per magnification
        for k in ("weights_sha256", "pretrained"):
            spec[k] = {m: encs[m].spec.attrs()[k] for m in mags}
    tiles = {m: ts.tiles[m] for m in mags}
    chunk_rows = cfg.batch_size * cfg.chunk_batches
    tile_size, target_mpp = meta.tiling["tile_size"], {m: meta.tiling["magnifications"][m] for m in mags}
    store_meta = FeatureStoreMeta(slide_id=slide_id, encoder=spec.pop("encoder"), tiles_sha256=meta.tiles_sha256,
                                  slide_fingerprint=meta.slide_fingerprint, tile_size=tile_size, target_mpp=target_mpp,
                                  on_tile_error=cfg.on_tile_error, extra=spec)
    dims = {m: enc.spec.out_dim for m in mags}
    writer = FeatureStoreWriter(out, tiles, dims, store_meta, chunk_rows=chunk_rows)
    try:
        for m in mags:
            _extract_mag(writer, m, slide_path, meta.base_mpp, tiles[m].coords, target_mpp[m], tile_size,
                         encs[m], cfg, slide_id, device)
        writer.finalize()
    finally:
        writer.close()
    return {m: len(tiles[m]) for m in mags}


def _extract_mag(writer: FeatureStoreWriter, mag: str, slide_path: str, base_mpp: float, coords: np.ndarray,
                 tile_mpp: float, size: int, enc: Encoder, cfg: ExtractConfig, slide_id: str,
                 device: torch.device) -> None:
    """Encode one magnification from the writer's resume point."""
    from tqdm import tqdm

    start = writer.rows_done(mag)
    n = len(coords)
    if start >= n:
        return
    ds = TileDataset(slide_path, base_mpp, coords[start:], tile_mpp, size)
    loader = make_loader(ds, cfg, device)
    feats: list[np.ndarray] = []
    failed: list[np.ndarray] = []
    row = start
    n_failed = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=start, desc=f"{slide_id} {mag}", unit="tile", file=sys.stdout,
               mininterval=1.0 if sys.stdout.isatty() else 15.0, dynamic_ncols=True)
    pos = start  # absolute index of the current batch's first tile
    for imgs, errs in loader:
        bad = np.array([bool(e) for e in errs])
        if bad.any():
            i = int(np.argmax(bad))
            x, y = (int(v) for v in coords[pos + i])
            if cfg.on_tile_error != "record":
                raise SlideError(slide_id, f"tile {mag} #{pos + i} at level-0 ({x}, {y}) failed to decode: {errs[i]}")
            log.warning("%s: %d tile(s) failed to decode at %s, first #%d at (%d, %d): %s",
                        slide_id, int(bad.sum()), mag, pos + i, x, y, errs[i])
            n_failed += int(bad.sum())
        f = enc(imgs).numpy()  # (B, D) float32
        f[bad] = 0.0
        f = f.astype(np.float16)  # (B, D); beyond ±65504 becomes inf here
        nonfinite = ~np.isfinite(f).all(1)
        if nonfinite.any():
            i = int(np.argmax(nonfinite))
            x, y = (int(v) for v in coords[pos + i])
            raise SlideError(slide_id, f"encoder {enc.spec.name!r} gave non-finite features (NaN/inf in float16) for "
                                       f"{int(nonfinite.sum())} {mag} tile(s), first #{pos + i} at level-0 ({x}, {y}); "
                                       "check the weights and the encoder's precision")
        feats.append(f)
        failed.append(bad)
        pos += len(imgs)
        if pos - row >= writer.chunk_rows or pos == n:
            writer.write(mag, row, np.concatenate(feats), np.concatenate(failed))
            row = pos
            feats, failed = [], []
        bar.update(len(imgs))
    bar.close()
    dt = time.perf_counter() - t0
    log.info("%s %s: %d tiles (%d failed to decode) in %.1f s (%.1f tiles/s)", slide_id, mag, n - start, n_failed,
             dt, (n - start) / max(dt, 1e-9))
