"""Build a big (default 100k x 80k px) pyramidal JPEG TIFF from real tissue, for benchmarks.

The slide is a mosaic of 1024-px crops of CMU-1-Small-Region.svs (random crop, rotation and
flip per cell, so it is not trivially periodic) inside a few irregular tissue pieces on a
glass-coloured background, streamed tile by tile with `pipeline.synthetic.slides.write_pyramid_tiff`.
Each pyramid level is assembled from crops pre-downsampled once, never from level 0.

    python bench/make_slide.py OUT.tiff [--width 100000 --height 80000] [--source SVS]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.synthetic.slides import level_shapes, write_pyramid_tiff  # noqa: E402

# the shared public slides (PIPELINE_SHARED_SLIDES relocates them, as for the tests)
DEFAULT_SOURCE = Path(os.environ.get("PIPELINE_SHARED_SLIDES", ROOT.parent / "shared" / "slides")) / "CMU-1-Small-Region.svs"
CELL = 1024  # mosaic cell (level-0 px); a multiple of every level's downsample
BLOCK = 256  # tissue/background decided per 256-px block (one level-0 tile)
N_CROPS = 12  # distinct source crops; x 8 rotations/flips = 96 cell variants
DOWNSAMPLE = 4


def read_source(source: str | Path) -> tuple[np.ndarray, float]:
    """The whole source region as RGB uint8 (transparent -> white) and its level-0 µm/px."""
    import openslide

    with openslide.OpenSlide(str(source)) as s:
        rgba = np.asarray(s.read_region((0, 0), 0, s.dimensions))
        mpp = float(s.properties.get(openslide.PROPERTY_NAME_MPP_X, 0.5))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255
    return rgb, mpp


def pick_crops(src: np.ndarray, rng: np.random.Generator, n: int = N_CROPS) -> list[np.ndarray]:
    """`n` CELL x CELL crops of the source, drawn among the most tissue-rich positions."""
    sat = cv2.cvtColor(src, cv2.COLOR_RGB2HSV)[..., 1] > 25
    h, w = sat.shape
    if h < CELL or w < CELL:
        raise ValueError(f"source {w}x{h} is smaller than one {CELL}-px cell")
    cands = [(y, x) for y in range(0, h - CELL + 1, 64) for x in range(0, w - CELL + 1, 64)]
    frac = np.array([sat[y : y + CELL, x : x + CELL].mean() for y, x in cands])
    good = np.flatnonzero(frac >= np.quantile(frac, 0.6))  # the richer 40 % of positions
    chosen = rng.choice(good, size=min(n, len(good)), replace=False)
    return [np.ascontiguousarray(src[cands[i][0] : cands[i][0] + CELL, cands[i][1] : cands[i][1] + CELL]) for i in chosen]


def tissue_blocks(rows: int, cols: int, rng: np.random.Generator, fraction: float = 0.45) -> np.ndarray:
    """Boolean (rows, cols) map of tissue blocks: a few irregular pieces, `fraction` of the slide."""
    m = np.zeros((rows, cols), np.float32)
    for _ in range(int(rng.integers(3, 6))):
        cy, cx = rng.uniform(0.25, 0.75) * rows, rng.uniform(0.2, 0.8) * cols
        ay, ax = rng.uniform(0.1, 0.25) * rows, rng.uniform(0.08, 0.2) * cols
        cv2.ellipse(m, (int(cx), int(cy)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
    noise = cv2.GaussianBlur(rng.standard_normal((rows, cols)).astype(np.float32), (0, 0), max(rows, cols) / 40)
    noise /= noise.std() + 1e-6
    m = cv2.GaussianBlur(m, (0, 0), max(rows, cols) / 60) + 0.25 * noise
    margin = max(1, rows // 25)
    m[:margin], m[-margin:], m[:, :margin], m[:, -margin:] = -9, -9, -9, -9
    return m > np.quantile(m, 1 - fraction)  # the threshold that gives exactly `fraction`


def _dihedral(a: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 rotations/flips of a square image, as a view."""
    a = np.rot90(a, t % 4)
    return a[:, ::-1] if t >= 4 else a


def make_mosaic_slide(
    out: str | Path,
    width: int = 100_000,
    height: int = 80_000,
    source: str | Path = DEFAULT_SOURCE,
    seed: int = 0,
    tile: int = 256,
    quality: int = 85,
) -> dict:
    """Write the mosaic slide to `out`; returns its geometry, mpp, build seconds and bytes."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    src, mpp = read_source(source)
    background = np.median(src[cv2.cvtColor(src, cv2.COLOR_RGB2HSV)[..., 1] < 10], axis=0).astype(np.uint8)
    crops = pick_crops(src, rng)
    del src
    shapes = level_shapes((height, width), None, DOWNSAMPLE)
    # per level: every crop downsampled once (area interpolation), from the level-0 crop
    level_crops = [crops]
    for k in range(1, len(shapes)):
        s = CELL // DOWNSAMPLE**k
        if s < 1:
            raise ValueError(f"{len(shapes)} levels need CELL >= {DOWNSAMPLE ** (len(shapes) - 1)}")
        level_crops.append([cv2.resize(c, (s, s), interpolation=cv2.INTER_AREA) for c in crops])
    cell_rows, cell_cols = -(-height // CELL), -(-width // CELL)
    variant = rng.integers(0, len(crops) * 8, size=(cell_rows, cell_cols))
    blocks = tissue_blocks(-(-height // BLOCK), -(-width // BLOCK), np.random.default_rng([seed, 1]))

    def tile_fn(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        d = DOWNSAMPLE**level
        cs, bs = CELL // d, max(1, BLOCK // d)
        out_t = np.empty((h, w, 3), np.uint8)
        for r in range(y // cs, (y + h - 1) // cs + 1):
            y0, y1 = max(y, r * cs), min(y + h, (r + 1) * cs)
            for c in range(x // cs, (x + w - 1) // cs + 1):
                x0, x1 = max(x, c * cs), min(x + w, (c + 1) * cs)
                v = int(variant[r, c])
                img = _dihedral(level_crops[level][v // 8], v % 8)
                out_t[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0 - r * cs : y1 - r * cs, x0 - c * cs : x1 - c * cs]
        m = blocks[y // bs : (y + h - 1) // bs + 1, x // bs : (x + w - 1) // bs + 1]
        if not m.all():
            m = np.repeat(np.repeat(m, bs, 0), bs, 1)
            oy, ox = y - (y // bs) * bs, x - (x // bs) * bs
            out_t[~m[oy : oy + h, ox : ox + w]] = background
        return out_t

    out = Path(out)
    write_pyramid_tiff(
        out, (height, width), tile_fn, mpp=mpp, downsample=DOWNSAMPLE, tile=tile, quality=quality,
        description=f"bench mosaic of {Path(source).name}; mpp={mpp:g}; seed={seed}",
    )
    return {
        "path": str(out), "width": width, "height": height, "mpp": mpp, "levels": len(shapes),
        "tissue_block_fraction": float(blocks.mean()),
        "seconds": time.perf_counter() - t0, "bytes": out.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: build the slide, print one summary line with build time, size and peak RSS."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.source.exists():
        ap.error(f"source slide not found: {a.source}")
    r = make_mosaic_slide(a.out, a.width, a.height, a.source, seed=a.seed)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"wrote {r['path']} {r['width']}x{r['height']} mpp={r['mpp']:g} levels={r['levels']} "
        f"tissue_blocks={r['tissue_block_fraction']:.2f} seconds={r['seconds']:.1f} "
        f"size_mib={r['bytes'] / 2**20:.1f} peak_rss_mib={rss:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
