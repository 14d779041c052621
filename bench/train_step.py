"""Benchmark: one M2OTCA training step vs a plain gated-attention layer over the same tiles.

At N = 10,000 / 2,500 / 625 tiles (20x / 10x / 5x), D = 512, B = 1:

- ``step_ms``: median time of an M2OTCA training step (forward, cross-entropy, backward,
  Adam step);
- ``attention_ms``: median time of forward + backward of a plain ABMIL gated-attention layer
  (projection, gated attention, pooling, classifier) over the same 13,125 instances;
- ``ratio`` = step_ms / attention_ms (goal <= 1.3 on CPU);
- ``epoch_ratio``: a training epoch over a 270-slide cohort read from Zarr feature stores,
  timed end to end on the wall clock (``BagCache`` loading + ``collate`` + training steps,
  through ``pipeline.mil.train.train_epoch`` with its background prefetch), divided by the sum of
  the same steps' compute alone (forward, backward, Adam; timed in a second pass over the same
  batches in the same order, every bag already in RAM, nothing loading); goal <= 1.1. It is
  measured for the real case: the step on its own thread (``--epoch-threads 1``, the
  default: torch's intra-op pool limited to one thread while the epoch runs) or on its own
  device (``--device cuda``), and the loader's prefetch thread on the other core. The
  cohort comes from ``pipeline.synthetic.bags`` (D = 512, 20-200 regions per slide, i.e. ~300-3,200
  20x and ~400-4,100 tiles in all per slide, ~0.6 GB of float16 features in 1,024-row chunks
  as extraction writes them), cached under ``--cohort-dir`` (the first run writes it, ~20 s).
  The measured epoch is the FIRST one, with a cold ``BagCache``: the only epoch that reads
  the stores (later epochs hit the RAM cache, their loading is nil by construction); the
  stores' files are dropped from the OS page cache first (``posix_fadvise(DONTNEED)``), so
  the reads come from disk. Cold epoch and compute-alone pass alternate ``--epoch-repeats``
  times (fresh cache each time); the median of the pairs' ratios is printed.
  Loading is CPU work (~3.5 ms per slide here: reading + Blosc-LZ4 decoding through
  ``pipeline.store.zarr_io``, ~2.9 ms, and float16 padding, ~0.7 ms) plus disk latency, so it hides
  fully only where a core is free for it: with ``--epoch-threads 0`` (the step's threads as
  ``--threads``, both of 2 cores busy with the step) the epoch costs about (step CPU +
  loading CPU) / 2, which is not how training runs.
  ``--epoch-slides 0`` skips it (``nan``). ``--epoch-step-tiles K`` has the epoch's steps see
  only the first K tiles per magnification: on a CPU, a step bound by dispatching its ~660 ops
  (each releasing and retaking the GIL), as a GPU step is by launching kernels, so the loading
  thread's effect on a GPU step can be studied without a GPU. The first epoch's bags are read
  by the reader process (``pipeline.mil.bag_reader``, started before the model is built, as
  ``train_fold`` does), or by the prefetch thread with ``--loader thread``. ``--pin`` keeps the
  steps on the first CPU and the loading (prefetch thread, reader) on the others, as on a GPU
  node, where the launching thread has a core to itself.

The two measurements are interleaved rep by rep so machine noise hits both alike. On a
machine shared with other jobs, multi-threaded wall times are unreliable (a descheduled
OpenMP thread stalls every parallel op, and M2OTCA has more ops than the plain layer): use
``--threads 1 --clock cpu`` there. Random features make Sinkhorn converge in a few
iterations; ``--sinkhorn-tol 0`` forces all ``sinkhorn_max_iter`` iterations (worst case).
``--device cuda`` runs the steps (and the epoch's model) on a GPU; loading stays on the CPU.
The last line printed is ``step_ms=<x> attention_ms=<x> ratio=<x> epoch_ratio=<x>``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.mil.bag_arrays import assign_groups  # noqa: E402
from pipeline.mil.models import ModelConfig, create_model  # noqa: E402
from pipeline.mil.models.abmil import ABMIL  # noqa: E402

TILES = {"20x": 10_000, "10x": 2_500, "5x": 625}


def make_batch(dim: int, n_groups: int, seed: int = 0) -> dict:
    """One synthetic bag (B = 1): 625 regions, 16 / 4 / 1 tiles per region at 20x / 10x / 5x."""
    gen = torch.Generator().manual_seed(seed)
    n_regions = TILES["5x"]
    regions = {
        t: torch.arange(n_regions).repeat_interleave(n // n_regions) for t, n in TILES.items()
    }
    groups = {t: torch.from_numpy(g) for t, g in assign_groups(regions["20x"], regions, n_groups).items()}
    side = int(n_regions**0.5)  # regions on a 25 x 25 grid; a region is 4 x 4 tiles at 20x, 2 x 2 at 10x
    xy = {}
    for t, n in TILES.items():
        k = int((n // n_regions) ** 0.5)  # tiles per region side
        i = torch.arange(n)
        r, j = regions[t], i % (k * k)
        col, row = (r % side) * k + j % k, (r // side) * k + j // k
        xy[t] = ((torch.stack([col, row], 1).float() + 0.5) * (4 // k)).unsqueeze(0)  # (1, N, 2) centres, 20x-tile units
    return {
        "feats": {t: torch.randn(1, n, dim, generator=gen).half() for t, n in TILES.items()},  # as stored
        "mask": {t: torch.ones(1, n, dtype=torch.bool) for t, n in TILES.items()},
        "group": {t: groups[t].unsqueeze(0) for t in TILES},
        "xy": xy,
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_steps(
    dim: int,
    reps: int,
    warmup: int,
    seed: int,
    profile: bool = False,
    clock: str = "wall",
    cfg: ModelConfig | None = None,
    device: str = "cpu",
) -> tuple[float, float]:
    """Median ms of an M2OTCA training step and of a plain gated-attention forward+backward."""
    torch.manual_seed(seed)
    cfg = cfg or ModelConfig()
    now = CLOCKS[clock]
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def time_ms(fn) -> float:
        sync()
        start = now()
        fn()
        sync()
        return (now() - start) * 1e3

    in_dims = {t: dim for t in TILES}
    batch = make_batch(dim, cfg.n_groups, seed)
    batch = {k: {t: v.to(dev) for t, v in part.items()} for k, part in batch.items()}
    labels = torch.tensor([1], device=dev)

    model = create_model("m2otca", in_dims, 2, cfg).train().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)

    baseline = ABMIL(dim, 2, cfg, "all").train().to(dev)
    all_feats = torch.cat([batch["feats"][t] for t in TILES], dim=1)  # (1, 13125, D)
    all_mask = torch.ones(all_feats.shape[:2], dtype=torch.bool, device=dev)  # (1, 13125)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(batch, labels)
        torch.nn.functional.cross_entropy(out["logits"], labels).backward()
        opt.step()

    def attention() -> None:
        baseline.zero_grad(set_to_none=True)
        logits, _ = baseline.branch(all_feats, all_mask)
        torch.nn.functional.cross_entropy(logits, labels).backward()

    for _ in range(warmup):
        step()
        attention()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    step_t, att_t = [], []
    for _ in range(reps):
        step_t.append(time_ms(step))
        att_t.append(time_ms(attention))
    return statistics.median(step_t), statistics.median(att_t)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block (0: left as they are)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def drop_page_cache(root: Path) -> int:
    """Ask the kernel to drop the cached pages of every file under `root` (no root needed)."""
    n = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


class FirstTiles(torch.nn.Module):
    """`model` on the first `k` tiles of each magnification of a batch: the same ops on small
    tensors, so a CPU step is bound by dispatching them, as a GPU step is by launching kernels."""

    def __init__(self, model: torch.nn.Module, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, batch: dict, labels: torch.Tensor | None = None) -> dict:
        cut = {key: {t: v[:, : self.k] for t, v in part.items()} for key, part in batch.items()}
        return self.model(cut, labels=labels)


def epoch_cohort(n_slides: int, dim: int, cohort_dir: str | Path, regions: tuple[int, int] = (20, 200), seed: int = 0):
    """The synthetic Zarr cohort of the epoch benchmarks, written once under `cohort_dir`
    (keyed by its settings and the feature codec: stores of another codec are not reused)."""
    from pipeline.store import FEATURE_CODEC
    from pipeline.synthetic.bags import SynthConfig, make_cohort

    scfg = SynthConfig(n_slides=n_slides, dim=dim, regions=regions, seed=seed)
    codec = FEATURE_CODEC.to_dict()["configuration"]
    return make_cohort(Path(cohort_dir) / f"{n_slides}-{dim}-{scfg.key()}-{codec['cname']}", scfg)


def measure_epoch_ratio(
    n_slides: int = 270,
    dim: int = 512,
    cohort_dir: str | Path = "/tmp/m2otca_bench_cohort",
    batch_size: int = 4,
    prefetch: int = 2,
    seed: int = 0,
    cfg: ModelConfig | None = None,
    regions: tuple[int, int] = (20, 200),
    drop_cache: bool = True,
    repeats: int = 2,
    verbose: bool = True,
    device: str = "cpu",
    step_threads: int = 1,
    step_tiles: int = 0,
    loader: str = "child",
    pin: bool = False,
) -> float:
    """First-epoch wall time over a Zarr cohort / sum of its steps' compute alone (see module doc);
    `step_threads` torch threads while it runs (0: leave them as they are); `step_tiles` > 0:
    the steps see only the first `step_tiles` tiles per magnification (:class:`FirstTiles`);
    `loader`: the first epoch's bags read by a reader process ("child") or by the prefetch thread;
    `pin`: the steps on the first CPU, the loading (prefetch thread, reader process) on the
    others, as on a GPU node, where the launching thread keeps a core to itself (Linux)."""
    import numpy as np

    from pipeline.mil.bags import cohort_cache
    from pipeline.mil.train import TrainConfig, make_optimizer, train_epoch

    if n_slides <= 0:
        return math.nan
    cfg = cfg or ModelConfig()
    start = time.perf_counter()
    cohort = epoch_cohort(n_slides, dim, cohort_dir, regions, seed)
    gen_s = time.perf_counter() - start
    tcfg = TrainConfig(batch_size=batch_size, seed=seed, prefetch=prefetch, model=cfg.to_dict())
    mags = list(cohort.feature_dirs)

    def fresh():
        torch.manual_seed(seed)
        model = create_model("m2otca", {t: dim for t in mags}, len(cohort.classes), cfg).to(device)
        if step_tiles:
            model = FirstTiles(model, step_tiles)
        return model, make_optimizer(model, tcfg), np.random.default_rng(seed)

    if pin:
        cpus = os.sched_getaffinity(0)
        step_cpu = {min(cpus)}
        loader_cpus = cpus - step_cpu
        if not loader_cpus:
            raise SystemExit("--pin needs at least 2 CPUs")
    ratios = []
    with torch_threads(step_threads):
        for rep in range(repeats):
            cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, cfg.n_groups)  # cold
            cache.read_in_child = loader == "child"
            ids = cache.usable(cohort.slides)
            n_dropped = drop_page_cache(cohort.feature_dir) if drop_cache else 0
            if pin:  # what this thread starts (the reader, the prefetch thread) inherits the loading CPUs
                os.sched_setaffinity(0, loader_cpus)
            cache.start_reader(ids)  # as train_fold does before building its model

            # the first epoch, end to end: every bag read from its store (prefetched), padded, trained on
            model, opt, rng = fresh()
            in_epoch: list[float] = []
            if pin:  # ... and the steps run on the step's CPU
                model.register_forward_pre_hook(lambda *_: os.sched_setaffinity(0, step_cpu))
            start = time.perf_counter()
            train_epoch(model, opt, cache, ids, mags, batch_size, rng, prefetch, in_epoch)
            epoch_s = time.perf_counter() - start

            # the same steps' compute alone (same order, same batches, bags in RAM, nothing loading)
            model, opt, rng = fresh()
            alone: list[float] = []
            train_epoch(model, opt, cache, ids, mags, batch_size, rng, 0, alone)
            steps_s = sum(alone)
            if pin:
                os.sched_setaffinity(0, cpus)
            ratios.append(epoch_s / steps_s)
            if verbose:
                if rep == 0:
                    n20 = [len(cache[s].feats["20x"]) for s in ids]
                    n_all = [sum(len(f) for f in cache[s].feats.values()) for s in ids]
                    print(
                        f"epoch cohort: {len(ids)} slides (20x tiles {min(n20)}-{max(n20)}, all tiles "
                        f"{min(n_all)}-{max(n_all)}, mean {statistics.mean(n_all):.0f}), D={dim}, batch "
                        f"{batch_size}, prefetch {prefetch}, torch threads {torch.get_num_threads()}, steps on "
                        f"{f'the first {step_tiles} tiles' if step_tiles else 'all tiles'}, bags read by the "
                        f"{'reader process' if loader == 'child' else 'prefetch thread'}"
                        f"{f', the steps on CPU {min(step_cpu)} and loading on the other {len(loader_cpus)}' if pin else ''}; "
                        f"written/found in {gen_s:.1f}s"
                    )
                print(
                    f"  repeat {rep}: {n_dropped} files dropped from the page cache; first epoch "
                    f"{epoch_s:.2f}s (its steps inside it {sum(in_epoch):.2f}s), same steps alone "
                    f"{steps_s:.2f}s: ratio {ratios[-1]:.3f}"
                    f"{f'; {cache.read_by_reader} of {len(ids)} bags read by the reader process' if loader == 'child' else ''}",
                    flush=True,
                )
            del cache, model, opt
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--profile", action="store_true", help="print a profile of one step")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or process CPU time (steadier on a shared machine with --threads 1)",
    )
    parser.add_argument(
        "--sinkhorn-tol",
        type=float,
        default=None,
        help="override the Sinkhorn tolerance (e.g. 0 to force all max_iter iterations)",
    )
    parser.add_argument("--epoch-slides", type=int, default=270, help="slides of the epoch cohort (0: skip)")
    parser.add_argument("--epoch-batch", type=int, default=4, help="slides per training step in the epoch")
    parser.add_argument("--prefetch", type=int, default=2, help="batches loaded ahead (0: no background loading)")
    parser.add_argument("--cohort-dir", default="/tmp/m2otca_bench_cohort", help="where the Zarr cohort is cached")
    parser.add_argument("--epoch-repeats", type=int, default=2, help="cold epoch + compute-alone pairs (median)")
    parser.add_argument("--keep-page-cache", action="store_true", help="do not drop the stores from the page cache")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (where the steps run)")
    parser.add_argument("--epoch-threads", type=int, default=1,
                        help="torch threads during the epoch (1: the step on one core, the loader on the other; 0: as --threads)")
    parser.add_argument("--epoch-step-tiles", type=int, default=0,
                        help="the epoch's steps see only the first K tiles per magnification (0: all): on a CPU, "
                             "a step bound by dispatching ops, as a GPU step is by launching kernels")
    parser.add_argument("--loader", choices=["child", "thread"], default="child",
                        help="who reads the first epoch's bags: a reader process (BagCache's default) or the prefetch thread")
    parser.add_argument("--pin", action="store_true",
                        help="the epoch's steps on the first CPU and its loading on the others (Linux): the step "
                             "keeps a core to itself, as a GPU step's launching thread does on a GPU node")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="Python's GIL switch interval in s during the run (0: the default, 5 ms); "
                             "how long the loading thread may hold the GIL the launching step waits for")
    args = parser.parse_args(argv)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig.from_dict({"sinkhorn_tol": args.sinkhorn_tol})

    step_ms, attention_ms = measure_steps(
        args.dim, args.reps, args.warmup, args.seed, args.profile, args.clock, cfg, args.device
    )
    epoch_ratio = measure_epoch_ratio(
        args.epoch_slides, args.dim, args.cohort_dir, args.epoch_batch, args.prefetch, args.seed,
        cfg, drop_cache=not args.keep_page_cache, repeats=args.epoch_repeats, device=args.device,
        step_threads=args.epoch_threads, step_tiles=args.epoch_step_tiles, loader=args.loader,
        pin=args.pin,
    )
    print(
        f"device={args.device} threads={torch.get_num_threads()} clock={args.clock} tiles={sum(TILES.values())} "
        f"dim={args.dim} sinkhorn_tol={cfg.sinkhorn_tol} switch_interval_ms={1e3 * sys.getswitchinterval():g} "
        f"epoch_threads={args.epoch_threads or torch.get_num_threads()} epoch_step_tiles={args.epoch_step_tiles} "
        f"loader={args.loader} pin={int(args.pin)}"
    )
    print(
        f"step_ms={step_ms:.1f} attention_ms={attention_ms:.1f} "
        f"ratio={step_ms / attention_ms:.3f} epoch_ratio={epoch_ratio:.3f}"
    )


if __name__ == "__main__":
    main()
