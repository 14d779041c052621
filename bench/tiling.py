"""Tiling benchmark: mask + nested 20x/10x/5x tiling of a big pyramidal JPEG TIFF of real tissue.

    python bench/tiling.py [--width 100000 --height 80000] [--slide PATH]

Builds (once, cached under /tmp) a mosaic of CMU-1-Small-Region with bench/make_slide.py, then
tiles it in a fresh process per run so peak RSS is the tiling's own. Prints as its last line
`seconds=<s> peak_rss_mib=<MiB> tiles_20x=<n> tiles_10x=<n> tiles_5x=<n>`; with --sizes it
also tiles smaller mosaics to show RSS does not grow with slide size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CHILD = r"""
import json, resource, sys, time
from pipeline.config import TilingConfig
from pipeline.tile_stage import tile_to_store
t0 = time.perf_counter()
counts = tile_to_store(sys.argv[1], sys.argv[2], TilingConfig(), qc_png=sys.argv[2] + ".qc.png")
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_rss_mib": rss, **counts}))
"""


def ensure_slide(width: int, height: int) -> Path:
    from make_slide import make_mosaic_slide

    path = Path(tempfile.gettempdir()) / f"bench_mosaic_{width}x{height}.tiff"
    if not path.exists():
        info = make_mosaic_slide(path, width, height)
        print(f"built {path} ({info['bytes'] / 2**20:.0f} MiB) in {info['seconds']:.1f} s", flush=True)
    return path


def run_once(slide: Path) -> dict:
    out = Path(tempfile.mkdtemp()) / "bench.zarr"
    r = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--slide", type=Path, default=None, help="tile this slide instead of a mosaic")
    ap.add_argument("--sizes", action="store_true", help="also tile 1/4 and 1/16 area mosaics (RSS vs size)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the median time is reported")
    args = ap.parse_args()
    if args.sizes and not args.slide:
        for f in (4, 2):
            s = ensure_slide(args.width // f, args.height // f)
            r = run_once(s)
            print(f"{args.width // f}x{args.height // f}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"tiles 20x={r['20x']}", flush=True)
    slide = args.slide or ensure_slide(args.width, args.height)
    runs = sorted((run_once(slide) for _ in range(args.repeat)), key=lambda r: r["seconds"])
    r = runs[len(runs) // 2]
    print(f"slide {slide}: runs {[round(x['seconds'], 2) for x in runs]} s")
    print(f"seconds={r['seconds']:.2f} peak_rss_mib={r['peak_rss_mib']:.0f} "
          f"tiles_20x={r['20x']} tiles_10x={r['10x']} tiles_5x={r['5x']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
