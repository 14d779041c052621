"""Benchmark: how much a second thread's work slows a dispatch-bound training step, by kind of work.

A GPU training step is a stream of kernel launches, each releasing and retaking the GIL; on a
CPU the same M2OTCA step on the first `--step-tiles` tiles per magnification is bound the same
way (dispatching ~660 small ops). This times `--steps` such steps alone, then beside a thread
doing one kind of work at a fixed rate, and prints each ratio (beside / alone):

- ``load``: reading bags from Zarr feature stores (``pipeline.mil.bags.load_bag``, what the
  trainer's prefetch thread does in the first epoch without the reader process: a cohort of
  fewer than 32 slides, or ``bench/train_step.py --loader thread``), `--rate` slides/s;
- ``unpickle``: receiving the same bags already read, pickled (what a reader process sending
  pickles would cost this process), `--rate` slides/s;
- ``receive``: receiving bags from the reader process (``BagCache.stream``, memory files handed
  over a socket: what the trainer's prefetch thread does in the first epoch), `--rate` slides/s;
- ``stat``: tiny GIL-releasing system calls (``os.stat``), as fast as they go;
- ``copy``: 4 MiB numpy copies (the GIL released inside), as fast as they go.

The cohort is ``bench/train_step.py``'s (``epoch_cohort``), cached under `--cohort-dir`; the
step is its :class:`FirstTiles` wrapper. Kinds are interleaved `--repeats` times; medians are
printed. The last line is ``load=<x> unpickle=<x> receive=<x> stat=<x> copy=<x>``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import FirstTiles, epoch_cohort  # noqa: E402

from pipeline.mil.bags import cohort_cache, collate, load_bag  # noqa: E402
from pipeline.mil.models import ModelConfig, create_model  # noqa: E402


def small_step(bags: list, mags: list[str], dim: int, k: int):
    """A training step of M2OTCA on the first `k` tiles per magnification of `bags`."""
    batch, labels = collate(bags, mags)
    torch.manual_seed(0)
    model = FirstTiles(create_model("m2otca", {t: dim for t in mags}, 2, ModelConfig()), k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(batch, labels=labels)
        torch.nn.functional.cross_entropy(out["logits"], labels).backward()
        opt.step()

    return step


def reader_stream(cohort, ids: list[str]):
    """Bags of `ids` over and over from a reader process each pass, ready before a pass starts."""
    while True:
        cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, ModelConfig().n_groups)
        cache.READ_AHEAD_MIN = 1
        it = cache.stream(ids)
        first = next(it)  # read here while the reader starts
        end = time.monotonic() + 30
        while not cache._reader.ready():
            if time.monotonic() > end:
                raise RuntimeError("the bag reader process did not start")
            time.sleep(0.01)
        yield first
        yield from it
        cache._reader.close()


def worker(kind: str, rate: float, stop: threading.Event, jobs: dict) -> None:
    """Does `kind` of work until `stop`, at `rate` units/s for load, unpickle and receive."""
    ids, stores, pickles, n_groups = jobs["ids"], jobs["stores"], jobs["pickles"], jobs["n_groups"]
    src = np.ones(4 << 20, np.uint8)
    dst = np.empty_like(src)
    start, i = time.perf_counter(), 0
    while not stop.is_set():
        if kind == "load":
            s = ids[i % len(ids)]
            load_bag(s, stores[s], 0, n_groups)
        elif kind == "unpickle":
            pickle.loads(pickles[i % len(pickles)])
        elif kind == "receive":
            next(jobs["stream"])
        elif kind == "stat":
            for _ in range(100):
                os.stat(jobs["path"])
        elif kind == "copy":
            np.copyto(dst, src)
        i += 1
        if kind in ("load", "unpickle", "receive") and (wait := start + i / rate - time.perf_counter()) > 0:
            time.sleep(wait)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=270, help="slides of the cohort the loader reads")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--step-tiles", type=int, default=32, help="tiles per magnification the step sees")
    parser.add_argument("--steps", type=int, default=60, help="steps timed per measurement")
    parser.add_argument("--rate", type=float, default=60.0, help="slides/s loaded, unpickled or received beside the step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cohort-dir", default="/tmp/m2otca_bench_cohort")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the step on one core, the other thread on the other

    cohort = epoch_cohort(args.slides, args.dim, args.cohort_dir)
    mags = list(cohort.feature_dirs)
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, ModelConfig().n_groups)
    ids = cache.usable(cohort.slides)
    bags = [cache[s] for s in ids[:40]]
    step = small_step(bags[:4], mags, args.dim, args.step_tiles)
    jobs = {"ids": ids, "stores": cache.stores, "n_groups": cache.n_groups, "path": str(cohort.sheet),
            "pickles": [pickle.dumps({k: {t: np.asarray(v) for t, v in getattr(b, k).items()}  # numpy, as a reader sends
                                      for k in ("feats", "group", "xy", "coords")}, protocol=5) for b in bags]}

    def timed() -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        return time.perf_counter() - t

    for _ in range(3):
        step()
    kinds = ["load", "unpickle", "receive", "stat", "copy"]
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(args.repeats):
        for kind in kinds:
            alone = timed()
            stop = threading.Event()
            if kind == "receive":
                jobs["stream"] = reader_stream(cohort, ids)
                next(jobs["stream"])  # the reader started and ready
            th = threading.Thread(target=worker, args=(kind, args.rate, stop, jobs), daemon=True)
            th.start()
            beside = timed()
            stop.set()
            th.join()
            ratios[kind].append(beside / alone)
            print(f"repeat {rep} {kind:9s}: {args.steps} steps alone {alone:.2f}s, beside {beside:.2f}s, "
                  f"ratio {ratios[kind][-1]:.3f}", flush=True)
    print(f"step on the first {args.step_tiles} tiles per magnification, D={args.dim}, {args.steps} steps, "
          f"load/unpickle/receive at {args.rate:g} slides/s, {args.repeats} repeats (medians)")
    print(" ".join(f"{k}={statistics.median(v):.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
