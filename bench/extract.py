"""Benchmark: feature extraction throughput on a big mosaic slide of real tissue.

Builds (or reuses, cached under /tmp) a pyramidal JPEG TIFF mosaic of CMU-1-Small-Region.svs
with `bench/make_slide.py`, tiles it with `tile_to_store`, takes N consecutive 20x tiles
(tile-store order, from the middle of the slide) and measures, in ONE run, tiles/s of:

- ``decode_tps``: decode only, through the extractor's own DataLoader (`make_loader` over a
  `TileDataset`, the same workers, collate and prefetch), no model;
- ``encoder_tps``: encoder only, random uint8 (B, S, S, 3) batches through the same `Encoder`
  call (`batch_transform` on the device, channels_last, inference_mode), with torch's default
  intra-op threads (the encoder alone, given the whole machine);
- ``full_tps``: the whole `extract_features` call (fingerprint check, loader, encoder, Zarr
  writes, finalize) on a tile store holding only those N tiles at 20x.

Every measurement is warmed up, then the three are repeated ``--repeats`` times in rotating
order so machine noise hits them alike; each figure is the median over repeats. The last line is
``decode_tps=<x> encoder_tps=<x> full_tps=<x> ratio=<full/min(decode,encoder)>``.

    python bench/extract.py [--slide PATH | --size 40000x30000] [--encoder resnet18_simclr]
                            [--n-tiles 512] [--batch-size 64] [--workers 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.devices import resolve_device  # noqa: E402
from pipeline.features.extract import (  # noqa: E402
    Encoder,
    ExtractConfig,
    TileDataset,
    extract_features,
    make_loader,
)
from pipeline.slides import fingerprint  # noqa: E402
from pipeline.store import (  # noqa: E402
    TileSet,  # noqa: E402
    read_tile_store,
    write_tile_store,
)

CACHE = Path(tempfile.gettempdir()) / "m2otca-bench"
MAG = "20x"
# store-managed attributes that write_tile_store recomputes for the subset store


def mib(kib: int) -> float:
    return kib / 1024  # ru_maxrss is in KiB on Linux


# ----------------------------------------------------------------------------- inputs


def prepare(slide: Path | None, size: tuple[int, int], cache: Path) -> tuple[Path, Path, bool]:
    """(slide, tile store, ran_child): build/tile in a child process when not cached, so the
    bench's own peak RSS is the extraction's, not the slide builder's."""
    cache.mkdir(parents=True, exist_ok=True)
    if slide is None:
        w, h = size
        slide = cache / f"mosaic-{w}x{h}.tiff"
        store = cache / f"mosaic-{w}x{h}.tiles.zarr"
    else:
        slide = slide.resolve()
        store = cache / f"{slide.stem}-{fingerprint(slide)[:12]}.tiles.zarr"
    ok = slide.exists() and store.exists()
    if ok:
        try:
            ok = read_tile_store(store).meta.slide_fingerprint == fingerprint(slide)
        except Exception:
            ok = False
    if not ok:
        code = (
            "import sys, resource; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/bench']\n"
            "from pathlib import Path\n"
            "slide, store, w, h = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])\n"
            "if not slide.exists():\n"
            "    from make_slide import make_mosaic_slide\n"
            "    r = make_mosaic_slide(slide, w, h)  # written atomically\n"
            "    print(f\"built {slide} in {r['seconds']:.1f} s ({r['bytes'] / 2**20:.0f} MiB)\", flush=True)\n"
            "from pipeline.config import TilingConfig\n"
            "from pipeline.tiling.stage import tile_to_store\n"
            "print('tiled', tile_to_store(slide, store, TilingConfig()))\n"
            "print(f'prepare peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}')\n"
        )
        w, h = size
        subprocess.run([sys.executable, "-c", code, str(ROOT), str(slide), str(store), str(w), str(h)], check=True)
    return slide, store, not ok


def subset_store(store: Path, n: int, out: Path, offset: int | None = None) -> tuple[Path, np.ndarray]:
    """A tile store holding only `n` consecutive 20x tiles of `store` (from the middle by
    default), same slide and attributes; returns it and the chosen coords."""
    ts = read_tile_store(store)
    full = ts.tiles[MAG]
    n = min(n, len(full))
    if n == 0:
        raise SystemExit(f"{store}: no {MAG} tiles (no tissue found?)")
    off = (len(full) - n) // 2 if offset is None else min(offset, len(full) - n)
    sub = TileSet(**{k: np.asarray(getattr(full, k))[off : off + n] for k in
                     ("coords", "grid", "tissue", "region", "parent")})
    tiling = {**ts.meta.tiling, "magnifications": {MAG: ts.meta.tiling["magnifications"][MAG]}}
    write_tile_store(out, {MAG: sub}, dataclasses.replace(ts.meta, tiling=tiling))
    return out, sub.coords


class ProbeEncoder(Encoder):
    """The extractor's Encoder; also notes torch's intra-op thread count and the seconds and
    tiles spent inside its calls (to split the full pipeline's wall time)."""

    def reset_probe(self) -> None:
        self.threads_seen: set[int] = set()
        self.busy_s = 0.0
        self.busy_tiles = 0

    def __call__(self, x_uint8: torch.Tensor) -> torch.Tensor:
        self.threads_seen.add(torch.get_num_threads())
        t0 = time.perf_counter()
        y = super().__call__(x_uint8)
        self.busy_s += time.perf_counter() - t0
        self.busy_tiles += len(y)
        return y


def cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (the DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ----------------------------------------------------------------------------- measurements


def measure_decode(slide: Path, store: Path, cfg: ExtractConfig, device: torch.device) -> float:
    """Tiles/s through the extractor's loader (workers included), no model."""
    ts = read_tile_store(store)
    a = ts.meta
    coords = ts.tiles[MAG].coords
    t0 = time.perf_counter()
    ds = TileDataset(str(slide), a.base_mpp, coords, a.tiling["magnifications"][MAG], a.tiling["tile_size"])
    n = 0
    for imgs, errs in make_loader(ds, cfg, device):
        if any(errs):
            raise RuntimeError(f"decode error in the benchmark slide: {next(e for e in errs if e)}")
        n += len(imgs)
    return n / (time.perf_counter() - t0)


def measure_encoder(enc: Encoder, batches: list[torch.Tensor]) -> float:
    """Tiles/s of the Encoder call alone on prepared random uint8 batches."""
    t0 = time.perf_counter()
    n = 0
    for x in batches:
        f = enc(x).numpy()
        n += len(f)
    return n / (time.perf_counter() - t0)


def measure_full(store: Path, encoder: str, enc: Encoder, cfg: ExtractConfig, work: Path) -> float:
    """Tiles/s of one whole `extract_features` call on the subset store."""
    out = work / "features.zarr"
    shutil.rmtree(out, ignore_errors=True)
    n_tiles = len(read_tile_store(store).tiles[MAG])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the progress bar
        counts = extract_features(store, out, encoder, mags=[MAG], cfg=cfg, enc=enc)
    dt = time.perf_counter() - t0
    assert counts == {MAG: n_tiles}, counts
    shutil.rmtree(out, ignore_errors=True)
    return n_tiles / dt


# ----------------------------------------------------------------------------- main


def parse_size(s: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 40000x30000, got {s!r}") from None
    return w, h


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--slide", type=Path, default=None, help="use this slide instead of a mosaic")
    src.add_argument("--size", type=parse_size, default=(40_000, 30_000), help="mosaic WxH (level-0 px)")
    ap.add_argument("--encoder", default="resnet18_simclr")
    ap.add_argument("--weights", default=None, help="local weights (none: random init; speed is the same)")
    ap.add_argument("--n-tiles", type=int, default=512, help="20x tiles per measurement")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes (ExtractConfig.num_workers)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the three measurements")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the slide and tile store are cached")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*RANDOM initialisation.*")

    t_prep = time.perf_counter()
    slide, store, prepared = prepare(a.slide, a.size, a.cache)
    t_prep = time.perf_counter() - t_prep
    ts_meta = read_tile_store(store).meta
    cfg = ExtractConfig(batch_size=a.batch_size, num_workers=a.workers, device=a.device)
    device = resolve_device(cfg.device)
    default_threads = torch.get_num_threads()
    w0, h0 = ts_meta.level0_size
    print(f"slide {slide} {w0}x{h0} ({slide.stat().st_size / 2**20:.0f} MiB), tiles {ts_meta.n_tiles}, "
          f"prepare {t_prep:.1f} s{' (built/tiled now)' if prepared else ' (cached)'}")
    print(f"machine: {os.cpu_count()} CPU(s), torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))

    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        work = Path(tmp)
        sub, coords = subset_store(store, a.n_tiles, work / "subset.tiles.zarr")
        warm, _ = subset_store(store, 2 * a.batch_size, work / "warm.tiles.zarr", offset=0)
        n = len(coords)
        size = ts_meta.tiling["tile_size"]
        enc = ProbeEncoder(a.encoder, a.weights, device, cfg.compile)
        enc.reset_probe()
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 256, (min(a.batch_size, n - i), size, size, 3), dtype=torch.uint8, generator=gen)
                   for i in range(0, n, a.batch_size)]
        if device.type == "cuda":
            batches = [b.pin_memory() for b in batches]
        print(f"encoder {a.encoder}, {n} tiles of {size} px at {MAG}, batch {a.batch_size}, "
              f"workers {a.workers}, torch default threads {default_threads}, interop {torch.get_num_interop_threads()}")

        # warm-up: every path once (loader start, first-call allocations, cudnn autotune, ...)
        measure_decode(slide, warm, cfg, device)
        measure_encoder(enc, batches[:2])
        measure_full(warm, a.encoder, enc, cfg, work)

        kinds = ("decode", "encoder", "full")
        runs: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}  # CPU seconds per tile, workers included
        inner: list[float] = []  # encoder tiles/s inside the full pipeline
        threads: dict[str, set[int]] = {k: set() for k in ("encoder", "full")}
        for r in range(a.repeats):
            for k in kinds[r % 3:] + kinds[: r % 3]:  # rotate the order each round
                c0 = cpu_seconds()
                enc.reset_probe()
                if k == "decode":
                    runs[k].append(measure_decode(slide, sub, cfg, device))
                elif k == "encoder":
                    runs[k].append(measure_encoder(enc, batches))
                else:
                    runs[k].append(measure_full(sub, a.encoder, enc, cfg, work))
                    inner.append(enc.busy_tiles / enc.busy_s)
                if k != "decode":
                    threads[k] |= enc.threads_seen
                cpu[k].append((cpu_seconds() - c0) / n)
            print(f"round {r + 1}/{a.repeats}: " + " ".join(f"{k}={v[-1]:.2f}" for k, v in runs.items())
                  + f" (tiles/s; encoder inside full {inner[-1]:.2f})", flush=True)

    med = {k: statistics.median(v) for k, v in runs.items()}
    ratio = med["full"] / min(med["decode"], med["encoder"])
    per_round = [f / min(d, e) for d, e, f in zip(runs["decode"], runs["encoder"], runs["full"])]
    self_rss = mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    child_rss = mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print("cpu_ms_per_tile " + " ".join(f"{k}={1e3 * statistics.median(v):.1f}" for k, v in cpu.items())
          + " (process + DataLoader workers; full ~ decode + encoder means no overhead of its own)")
    print(f"full pipeline: encoder runs at {statistics.median(inner):.2f} tiles/s inside it "
          f"({statistics.median(inner) / med['encoder']:.3f} x encoder-only); per-round ratio "
          + " ".join(f"{x:.3f}" for x in per_round) + f", median {statistics.median(per_round):.3f}")
    print(f"torch threads: encoder-only {sorted(threads['encoder'])}, full pipeline main process "
          f"{sorted(threads['full'])}, each of {a.workers} DataLoader worker(s) 1")
    print(f"peak_rss_mib main={self_rss:.0f} children={child_rss:.0f}"
          + (" (children include the slide build/tiling just run; rerun for the workers alone)"
             if prepared else " (the DataLoader workers)"))
    print(f"decode_tps={med['decode']:.2f} encoder_tps={med['encoder']:.2f} full_tps={med['full']:.2f} "
          f"ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
