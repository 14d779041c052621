"""Benchmark: cohort feature QC (``pipeline.report.cohort_qc``) memory and time against cohort size.

Writes a synthetic cohort of feature stores once (``pipeline.synthetic.bags``, through the pipeline's
own ``FeatureStoreWriter``; D = 512, ~190-320 20x tiles per slide plus their 10x and 5x tiles,
chunked as extraction writes them), cached under ``--cache``. Then, for each size in ``--sizes``,
a fresh child process runs the whole QC (Dask statistics of every store, PCA, outliers, a
``site`` column of four random sites with the batch-effect score, the figure) on the first N
slides and reports its peak RSS (``ru_maxrss``) and wall seconds. The goal: peak RSS flat in the
cohort size (within 20 % from the smallest to the largest size).

The last line printed is ``rss_mib_<n>=<x> ... seconds_<n>=<x> ... rss_ratio=<largest / smallest>``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path("/tmp/m2otca_bench_cohort_qc")


def synth_config(n: int, dim: int):
    from pipeline.synthetic.bags import SynthConfig

    return SynthConfig(n_slides=n, dim=dim, regions=(12, 20), lesion_regions=(2, 3), seed=0)


def build(cache: Path, n: int, dim: int) -> Path:
    """The cohort's folder (written once, reused while its config is unchanged)."""
    from pipeline.synthetic.bags import make_cohort

    t = time.perf_counter()
    cohort = make_cohort(cache / f"n{n}-d{dim}", synth_config(n, dim))
    print(f"cohort of {n} stores at {cohort.feature_dir} ({time.perf_counter() - t:.0f} s)", flush=True)
    return cohort.sheet.parent


def child(folder: Path, n: int, workers: int) -> None:
    """Run the QC on the first n slides; print one JSON line with peak RSS and seconds."""
    import numpy as np

    from pipeline.report.cohort_qc import QCConfig, cohort_qc
    from pipeline.slides.sheet import read_sheet
    from pipeline.synthetic.bags import MAGS

    rows = read_sheet(folder / "slides.tsv", check_files=False)[:n]
    rng = np.random.default_rng(0)
    rows = [replace(r, site=f"H{int(rng.integers(4))}") for r in rows]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    s = cohort_qc(rows, {m: folder / "features" for m in MAGS}, folder / f"qc-{n}", QCConfig(workers=workers))
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "peak_rss_mib": peak, "rss_before_mib": base, "seconds": dt,
                      "batch_score": s["batch_effect"].get("score"), "listed": s["listed"]}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,1000,2000", help="comma-separated cohort sizes")
    ap.add_argument("--dim", type=int, default=512, help="feature dimension D")
    ap.add_argument("--workers", type=int, default=1, help="Dask threads of the QC")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the synthetic cohort is kept")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.folder, a.child, a.workers)
        return 0
    sizes = sorted(int(v) for v in a.sizes.split(","))
    folder = build(a.cache, sizes[-1], a.dim)
    results = []
    for n in sizes:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--folder", str(folder),
                              "--workers", str(a.workers)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        if out.returncode:
            print(out.stdout[-2000:], out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{n:>6} stores: peak RSS {r['peak_rss_mib']:.0f} MiB (after imports {r['rss_before_mib']:.0f} MiB), "
              f"{r['seconds']:.1f} s, batch score {r['batch_score']}, {r['listed']} listed", flush=True)
    line = " ".join(f"rss_mib_{r['n']}={r['peak_rss_mib']:.0f}" for r in results)
    line += " " + " ".join(f"seconds_{r['n']}={r['seconds']:.1f}" for r in results)
    line += f" rss_ratio={results[-1]['peak_rss_mib'] / results[0]['peak_rss_mib']:.3f}"
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
