"""Benchmark: what extraction's glibc heap settings (`pipeline.features.extract`, mallopt / malloc_trim
through ctypes) buy on CPU, measured in one run.

Realistic configuration: the `resnet18_simclr` encoder on CPU (torch's default threads), batches
of 64 random uint8 tiles of 256 px, through the extractor's own `Encoder` call. Each variant
runs in a fresh process (the settings are process-wide and permanent); variants alternate
``--repeats`` times and each figure is the median. CPU time (user + system) is used, as page
faults are system time and the machine may be shared; minor page faults are counted too.

- ``heap``: a batch with `keep_freed_memory()` (mallopt: no mmap for big blocks, high trim
  threshold: freed activations stay in the heap and are reused) vs without (glibc's default:
  every big activation is a fresh mmap, zero-filled page by page, unmapped on free);
- ``fork``: the first batch after a DataLoader worker forks from a process whose heap holds
  the previous batches' freed activations, with `trim_heap()` (malloc_trim) before the fork,
  as `make_loader` does, vs without (the parent then copy-on-write-faults its heap pages, and
  the worker keeps the old copies: its private memory is printed).

The last line is ``heap_cpu_ratio=<without/with> fork_cpu_ratio=<without trim/with trim>``
(> 1: the call pays off in CPU time).

    python bench/private_apis.py [--batches 3] [--repeats 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_minflt


def child(what: str, on: bool, batches: int, batch_size: int, tile: int) -> dict[str, float]:
    """One variant in this (fresh) process: CPU seconds, wall seconds and minor faults per batch."""
    sys.path.insert(0, str(ROOT))
    import torch

    import pipeline.features.extract as ex

    if what == "heap" and not on:
        ex.keep_freed_memory = lambda: False  # Encoder() calls it on CPU
    enc = ex.Encoder("resnet18_simclr", None, torch.device("cpu"))
    x = torch.randint(0, 256, (batch_size, tile, tile, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    enc(x)  # warm-up; leaves one batch's activations freed in the heap (resident when kept)
    loader = None
    if what == "fork":
        enc(x)
        if on:
            ex.trim_heap()
        ds = torch.utils.data.TensorDataset(torch.zeros(64, 1))
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, prefetch_factor=1))
        next(loader)  # the worker has forked and lives while the batch runs
        batches = 1
    cpu0, flt0 = _usage()
    t0 = time.perf_counter()
    for _ in range(batches):
        enc(x)
    wall = time.perf_counter() - t0
    cpu1, flt1 = _usage()
    worker_mib = _children_private_mib() if loader is not None else 0.0
    del loader
    return {"cpu_s": (cpu1 - cpu0) / batches, "wall_s": wall / batches, "faults": (flt1 - flt0) / batches,
            "threads": torch.get_num_threads(), "worker_mib": worker_mib}


def _children_private_mib() -> float:
    """Private memory (MiB) of this process's children: a forked worker's copy of pages the
    parent wrote to after the fork (copy-on-write) is its own from then on."""
    total = 0
    for pid in Path(f"/proc/self/task/{os.getpid()}/children").read_text().split():
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def run_child(args: argparse.Namespace, what: str, on: bool) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", what, "--on", str(int(on)), "--batches", str(args.batches),
           "--batch-size", str(args.batch_size), "--tile", str(args.tile)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if r.returncode:
        raise SystemExit(f"{what} child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3, help="timed batches per heap process (after a warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of each variant (median)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tile", type=int, default=256, help="tile side (px)")
    ap.add_argument("--what", default="heap,fork", help="measurements to run, comma-separated")
    ap.add_argument("--child", choices=["heap", "fork"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--on", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, bool(args.on), args.batches, args.batch_size, args.tile)))
        return
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    ratios = {}
    labels = {"heap": "keep_freed_memory", "fork": "trim_heap before the fork"}
    for what in args.what.split(","):
        label = labels[what]
        res: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.repeats):
            for on in (True, False):
                res[on].append(run_child(args, what, on))
        med = {on: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for on, rs in res.items()}
        for on in (True, False):
            m = med[on]
            worker = f", the idle worker's private memory {m['worker_mib']:.0f} MiB" if what == "fork" else ""
            print(f"{what}: {'with' if on else 'without'} {label}: {m['cpu_s']:.2f} s CPU, {m['wall_s']:.2f} s wall, "
                  f"{m['faults']:,.0f} minor faults per batch ({m['threads']:.0f} threads){worker}", flush=True)
        ratios[what] = med[False]["cpu_s"] / med[True]["cpu_s"]
    print(" ".join(f"{w}_cpu_ratio={r:.3f}" for w, r in ratios.items()))


if __name__ == "__main__":
    main()
