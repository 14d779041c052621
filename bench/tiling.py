"""Tiling benchmark: mask + nested 20x/10x/5x tiling of a big pyramidal JPEG TIFF of real tissue.

    python bench/tiling.py [--width 100000 --height 80000] [--mpp 0.25] [--slide PATH] [--vs hs2p]

Builds (once, cached under /tmp) a mosaic of CMU-1-Small-Region with bench/make_slide.py, then
tiles it in a fresh process per run, so peak RSS is the tiling's own. The slide is read at
`--mpp` µm/px (default 0.25, a 40x scan; the mosaic's own tag says 0.499, used with --mpp 0).
Our run is the whole tiling stage (`tile_to_store`: tile store, QC picture and mask PNG).

Prints as its last line `seconds=<s> peak_rss_mib=<MiB> tiles_20x=<n> tiles_10x=<n> tiles_5x=<n>`.
With `--vs hs2p` (`pip install -e '.[bench]'`) it runs hs2p 6.1 on the same slide in the same
run (alternating with ours; one `tile_slide` + `save_tiling_result` per magnification, hsv
segmentation, 35 % tissue coverage), tiles CMU-1-Small-Region with both, prints both, and ends
with the ratios ours / hs2p: `seconds_ratio=.. peak_rss_ratio=.. cmu_ratio_20x=.. ..`.
With --sizes it also tiles smaller mosaics to show RSS does not grow with slide size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OURS = r"""
import json, resource, sys, time
from pipeline.config import TilingConfig
from pipeline.tiling.stage import tile_to_store
slide, out, mpp, options = sys.argv[1], sys.argv[2], float(sys.argv[3]) or None, json.loads(sys.argv[4])
t0 = time.perf_counter()
counts = tile_to_store(slide, out, TilingConfig(**options), mpp=mpp, qc_png=out + ".qc.png", mask_png=out + ".mask.png")
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_rss_mib": rss, **counts}))
"""

HS2P = r"""
import json, resource, sys, time
from pathlib import Path
from hs2p import (FilterConfig, MaskSamplingConfig, SegmentationConfig, SlideSpec, TilingConfig,
                  save_tiling_result, tile_slide)
from pipeline.config import TilingConfig as Ours
slide, out, mpp = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]) or None
ours = Ours()
spec = SlideSpec(sample_id="bench", image_path=Path(slide), spacing_at_level_0=mpp)
masks = MaskSamplingConfig(pixel_mapping={"background": 0, "tissue": 1},
                           min_coverage={"tissue": ours.tissue_threshold})
t0 = time.perf_counter()
counts = {}
for name, um in ours.magnifications.items():
    tiling = TilingConfig(requested_spacing_um=um, requested_tile_size_px=ours.tile_size, tolerance=0.05, overlap=0.0)
    res = tile_slide(spec, tiling=tiling, segmentation=SegmentationConfig(method="hsv"),
                     filtering=FilterConfig(), masks=masks)
    save_tiling_result(res, out / name)
    counts[name] = int(res.num_tiles)
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_rss_mib": rss, **counts}))
"""

CHILDREN = {"ours": OURS, "hs2p": HS2P}
CMU = HERE.parent.parent / "shared" / "slides" / "CMU-1-Small-Region.svs"


def ensure_slide(width: int, height: int) -> Path:
    from make_slide import make_mosaic_slide

    path = Path(tempfile.gettempdir()) / f"bench_mosaic_{width}x{height}.tiff"
    if not path.exists():
        info = make_mosaic_slide(path, width, height)
        print(f"built {path} ({info['bytes'] / 2**20:.0f} MiB) in {info['seconds']:.1f} s", flush=True)
    return path


def run_once(slide: Path, mpp: float = 0.0, tool: str = "ours", options: dict | None = None) -> dict:
    """Tile `slide` with `tool` in a fresh process; its seconds, peak RSS (MiB) and tile counts.

    `options` are our TilingConfig fields (hs2p runs with its defaults)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.zarr"
        r = subprocess.run([sys.executable, "-c", CHILDREN[tool], str(slide), str(out), str(mpp), json.dumps(options or {})],
                           capture_output=True, text=True, cwd=HERE.parent)
    if r.returncode != 0:
        raise SystemExit(f"{tool} failed on {slide}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def summary(runs: list[dict]) -> dict:
    """Median seconds and peak RSS of repeated runs, with their (identical) tile counts."""
    out = dict(runs[0])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in runs)
    out["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return out


def counts_text(r: dict, mags: list[str]) -> str:
    return "/".join(str(r[m]) for m in mags)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--mpp", type=float, default=0.25, help="base µm/px the slide is read at (0: its own tag)")
    ap.add_argument("--mask-mpp", type=float, default=None, help="our tiling.mask_mpp (default: the config's)")
    ap.add_argument("--slide", type=Path, default=None, help="tile this slide instead of a mosaic")
    ap.add_argument("--sizes", action="store_true", help="also tile 1/4 and 1/16 area mosaics (RSS vs size)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each tool; the median is reported")
    ap.add_argument("--vs", choices=["hs2p"], default=None, help="also run this tiler, alternating with ours")
    args = ap.parse_args(argv)
    options = {} if args.mask_mpp is None else {"mask_mpp": args.mask_mpp}
    mags = ["20x", "10x", "5x"]
    if args.sizes and not args.slide:
        for f in (4, 2):
            s = ensure_slide(args.width // f, args.height // f)
            r = run_once(s, args.mpp, options=options)
            print(f"{args.width // f}x{args.height // f}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"tiles 20x={r['20x']}", flush=True)
    slide = args.slide or ensure_slide(args.width, args.height)
    tools = ["ours"] + ([args.vs] if args.vs else [])
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    for _ in range(args.repeat):  # alternate, so both see the same machine load
        for t in tools:
            runs[t].append(run_once(slide, args.mpp, t, options))
    res = {t: summary(rs) for t, rs in runs.items()}
    print(f"slide {slide} at {args.mpp or 'its own'} µm/px, median of {args.repeat}:")
    for t, r in res.items():
        print(f"  {t:5s} {r['seconds']:.2f} s (runs {r['all_seconds']}), peak RSS {r['peak_rss_mib']:.0f} MiB, "
              f"tiles 20x/10x/5x {counts_text(r, mags)}")
    if args.vs:
        cmu = {t: run_once(CMU, 0.0, t, options) for t in tools}
        print(f"{CMU.name}: tiles 20x/10x/5x " + ", ".join(f"{t} {counts_text(cmu[t], mags)}" for t in tools))
    r = res["ours"]
    print(f"seconds={r['seconds']:.2f} peak_rss_mib={r['peak_rss_mib']:.0f} "
          f"tiles_20x={r['20x']} tiles_10x={r['10x']} tiles_5x={r['5x']}")
    if args.vs:
        h = res[args.vs]
        print(f"seconds_ratio={r['seconds'] / h['seconds']:.2f} peak_rss_ratio={r['peak_rss_mib'] / h['peak_rss_mib']:.2f} "
              + " ".join(f"cmu_ratio_{m}={cmu['ours'][m] / max(cmu[args.vs][m], 1):.2f}" for m in mags))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
