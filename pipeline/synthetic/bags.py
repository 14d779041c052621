"""Synthetic multi-magnification feature stores: a cohort whose label needs a fine AND a coarse scale.

No slides, no encoder: every slide is a nested grid of regions (the coarsest, 5x, cells) holding
4x4 20x tiles, 2x2 10x tiles and one 5x tile, with region ids in raster order, coordinates,
grid positions and parents consistent with :mod:`pipeline.tiling.grid`. Its features are written
through :class:`pipeline.store.FeatureStoreWriter`, so the training code reads them exactly as it
reads real ones; a slide sheet TSV (`slide_id`, `path`, `label`, `patient_id`, optional `split`)
comes with them.

Features (D per magnification) of a tile at magnification t in region r of slide s::

    x = A_t z_r + b_s + noise,      z_r ~ N(0, I_8) (tissue context shared by the scales),
                                    b_s ~ N(0, slide_shift^2 I) (slide / stain effect),
                                    noise ~ N(0, I)

plus the evidence of a lesion: a small cluster of neighbouring regions (`lesion_regions`) in
which a fraction `fine_fraction` of the 20x tiles carries `fine_amp * u_20` and the 5x tile
carries `coarse_amp * u_5`. u_20 appears only in 20x features, u_5 only in 5x features (10x
carries no evidence). Class k > 0 has its own pair (u_20^k, u_5^k), class 0 ("normal") none.

A positive slide has both pieces of evidence in the SAME regions. A normal slide is drawn from
the decoy kinds `decoys` (each equally likely): ``none``; ``fine`` (the 20x direction alone);
``coarse`` (the 5x direction alone); ``apart`` (both, in two clusters far apart) — decoy
directions are those of a random positive class. So one scale alone cannot separate the
classes, and with ``apart`` decoys neither can two scales looked at independently: the
evidence must co-locate. Bag sizes vary (tissue = a random blob of `regions` regions, some
20x/10x tiles dropped at the tissue border). Everything follows from `seed`; slide i depends
only on (seed, i), so cohorts of different sizes share their first slides.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import StoreError
from pipeline.store import (
    FeatureStoreMeta,
    FeatureStoreWriter,
    TileSet,
    store_status,
    tiles_digest,
    write_failed_store,
)

MAGS = ("20x", "10x", "5x")
PER_SIDE = {"20x": 4, "10x": 2, "5x": 1}  # tiles per region side at each magnification
TILE_PX = {"20x": 448, "10x": 896, "5x": 1792}  # level-0 px per tile side (0.25 µm/px scan, 224 px tiles)
DECOYS = ("none", "fine", "coarse", "apart")
POSITIVE_KINDS = ("colocated", "independent")
ENCODER = "synthetic"


@dataclass
class SynthConfig:
    n_slides: int = 120
    classes: tuple[str, ...] = ("normal", "tumor")  # class 0 has no lesion
    dim: int = 64  # feature dimension D (every magnification)
    regions: tuple[int, int] = (16, 64)  # tissue regions per slide (uniform in [lo, hi])
    lesion_regions: tuple[int, int] = (3, 6)  # regions of one evidence cluster
    fine_amp: float = 5.0  # amplitude of u_20 on a lesion 20x tile
    fine_fraction: float = 0.5  # fraction of a lesion region's 20x tiles with u_20
    coarse_amp: float = 6.0  # amplitude of u_5 on a lesion 5x tile
    context_amp: float = 0.7  # scale of the shared tissue context A_t z_r
    slide_shift: float = 0.3  # std of the per-slide shift b_s
    decoys: tuple[str, ...] = DECOYS  # kinds of normal slides
    decoy_weights: tuple[float, ...] | None = None  # their probabilities (None: equally likely)
    # where a positive slide's two pieces of evidence sit: "colocated" (the same regions: the
    # label needs co-location) or "independent" (each scale's cluster placed on its own, so the
    # label only needs both scales)
    positive_kind: str = "colocated"
    # permute the 5x tiles' features inside each bag (tiles keep their place): co-location is
    # destroyed, per-scale evidence kept
    shuffle_coarse: bool = False
    positive_fraction: float = 0.5  # fraction of slides with a lesion (split evenly over classes > 0)
    drop_fine: float = 0.1  # chance that a 20x tile of a border region is missing
    drop_mid: float = 0.05  # same for 10x tiles
    second_slide: float = 0.3  # chance that a slide is the patient's second one (same label)
    test_fraction: float = 0.0  # > 0: a `split` column with this fraction of patients as `test`
    failed_tiles: float = 0.0  # fraction of tiles marked failed (features zero), all magnifications
    chunk_rows: int = 1024  # rows per stored chunk, as extraction writes them (64 tiles x 16 batches)
    seed: int = 0
    # seed of the cohort-wide evidence directions and context maps (None: `seed`); cohorts with
    # different `seed` and the same `world_seed` are independent samples of one task
    world_seed: int | None = None

    def __post_init__(self) -> None:
        self.classes = tuple(self.classes)
        self.regions = tuple(int(v) for v in self.regions)
        self.lesion_regions = tuple(int(v) for v in self.lesion_regions)
        self.decoys = tuple(self.decoys)
        if self.decoy_weights is not None:
            self.decoy_weights = tuple(float(w) for w in self.decoy_weights)
            if len(self.decoy_weights) != len(self.decoys) or min(self.decoy_weights) < 0 or sum(self.decoy_weights) <= 0:
                raise ValueError(f"decoy_weights must be {len(self.decoys)} non-negative numbers, got {self.decoy_weights}")
        if self.positive_kind not in POSITIVE_KINDS:
            raise ValueError(f"positive_kind must be one of {POSITIVE_KINDS}, got {self.positive_kind!r}")
        if len(self.classes) < 2:
            raise ValueError("need at least two classes")
        if not 1 <= self.regions[0] <= self.regions[1]:
            raise ValueError(f"regions must be 1 <= lo <= hi, got {self.regions}")
        if not 1 <= self.lesion_regions[0] <= self.lesion_regions[1]:
            raise ValueError(f"lesion_regions must be 1 <= lo <= hi, got {self.lesion_regions}")
        if 2 * self.lesion_regions[1] > self.regions[0]:
            raise ValueError("regions[0] must hold two lesion clusters (the 'apart' decoy)")
        unknown = set(self.decoys) - set(DECOYS)
        if unknown or not self.decoys:
            raise ValueError(f"decoys must be a non-empty subset of {DECOYS}, got {self.decoys}")

    def key(self) -> str:
        """A short hash of the config: cohorts are cached under it."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SynthSlide:
    slide_id: str
    patient_id: str
    label: str
    kind: str  # "lesion" (positive) or the decoy kind of a normal slide
    tiles: dict[str, TileSet]
    feats: dict[str, np.ndarray]  # mag -> (N_t, D) float16
    failed: dict[str, np.ndarray]  # mag -> (N_t,) bool
    lesion: list[int] = field(default_factory=list)  # region ids with evidence (either scale)


@dataclass
class SynthCohort:
    sheet: Path
    feature_dir: Path
    slides: list[str]
    labels: dict[str, str]
    kinds: dict[str, str]
    classes: list[str]

    @property
    def feature_dirs(self) -> dict[str, Path]:
        """Magnification -> feature store folder (the same store holds every magnification)."""
        return {m: self.feature_dir for m in MAGS}


def _directions(cfg: SynthConfig) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Context maps A_t (8, D) and orthonormal evidence directions (n_pos, 2, D), cohort-wide."""
    rng = np.random.default_rng([cfg.seed if cfg.world_seed is None else cfg.world_seed, 2**31])
    n_pos = len(cfg.classes) - 1
    if 2 * n_pos > cfg.dim:
        raise ValueError("dim too small for the evidence directions")
    q, _ = np.linalg.qr(rng.standard_normal((cfg.dim, 2 * n_pos)))  # (D, 2 n_pos) orthonormal
    dirs = q.T.reshape(n_pos, 2, cfg.dim)  # [k, 0] = u_20^k, [k, 1] = u_5^k
    ctx = {t: rng.standard_normal((8, cfg.dim)) * cfg.context_amp / np.sqrt(8) for t in MAGS}
    return ctx, dirs


def _blob(rng: np.random.Generator, n: int) -> tuple[np.ndarray, int]:
    """n region cells forming one blob: (n, 2) (row, col) sorted in raster order, and grid cols."""
    side = int(np.ceil(np.sqrt(n * 2.0))) + 2
    r, c = np.divmod(np.arange(side * side), side)
    centre = rng.uniform(side * 0.35, side * 0.65, 2)
    stretch = rng.uniform(0.6, 1.6)
    dist = np.hypot((r - centre[0]) * stretch, (c - centre[1]) / stretch) + rng.uniform(0, 1.2, r.size)
    keep = np.sort(np.argsort(dist, kind="stable")[:n])  # raster order
    return np.stack([r[keep], c[keep]], 1), side


def _cluster(rng: np.random.Generator, cells: np.ndarray, size: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of `size` neighbouring regions (a seed region and its nearest ones)."""
    ok = np.ones(len(cells), bool)
    if exclude is not None and len(exclude):
        # far from the excluded cluster: at least 2 region sides away from each of its cells
        d = np.abs(cells[:, None, :] - cells[exclude][None, :, :]).max(-1).min(1)
        ok &= d >= 2
        if ok.sum() < size:  # small blob: anything outside the excluded cluster
            ok = np.ones(len(cells), bool)
            ok[exclude] = False
    seed = rng.choice(np.flatnonzero(ok))
    d = np.hypot(*(cells - cells[seed]).T) + rng.uniform(0, 0.1, len(cells))
    d[~ok] = np.inf
    return np.sort(np.argsort(d, kind="stable")[:size])


def _tiles(rng: np.random.Generator, cells: np.ndarray, cols: int, cfg: SynthConfig) -> dict[str, TileSet]:
    """Tiles of every magnification, ordered by region id, then row and column inside the region."""
    region_ids = cells[:, 0] * cols + cells[:, 1]  # raster order, increasing
    # border regions (a missing 4-neighbour) may lose some 20x / 10x tiles
    present = set(map(tuple, cells))
    border = np.array([any((r + dr, c + dc) not in present for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)))
                       for r, c in cells])
    out: dict[str, TileSet] = {}
    for t in MAGS:
        k = PER_SIDE[t]
        iy, ix = np.divmod(np.arange(k * k), k)  # position inside the region, row-major
        rows = (cells[:, 0:1] * k + iy[None]).reshape(-1)
        cols_t = (cells[:, 1:2] * k + ix[None]).reshape(-1)
        region = np.repeat(region_ids, k * k)
        drop = {"20x": cfg.drop_fine, "10x": cfg.drop_mid}.get(t, 0.0)
        keep = ~(np.repeat(border, k * k) & (rng.random(rows.size) < drop))
        rows, cols_t, region = rows[keep], cols_t[keep], region[keep]
        out[t] = TileSet(
            coords=np.stack([cols_t * TILE_PX[t], rows * TILE_PX[t]], 1).astype(np.int64),
            grid=np.stack([rows, cols_t], 1).astype(np.int32),
            tissue=np.ones(rows.size, np.float32),
            region=region.astype(np.int32),
            parent=np.full(rows.size, -1, np.int64),
        )
    for fine, coarse in zip(MAGS[:-1], MAGS[1:]):  # parent: the tile one magnification coarser
        index = {tuple(g): i for i, g in enumerate(out[coarse].grid.tolist())}
        out[fine].parent = np.array([index.get((r // 2, c // 2), -1) for r, c in out[fine].grid.tolist()], np.int64)
    return out


def make_slide(i: int, cfg: SynthConfig, label: int, patient_id: str,
               ctx: dict[str, np.ndarray] | None = None, dirs: np.ndarray | None = None) -> SynthSlide:
    """Slide number `i` of the cohort (deterministic in (cfg.seed, i, label))."""
    if ctx is None or dirs is None:
        ctx, dirs = _directions(cfg)
    rng = np.random.default_rng([cfg.seed, i])
    n = int(rng.integers(cfg.regions[0], cfg.regions[1] + 1))
    cells, cols = _blob(rng, n)
    tiles = _tiles(rng, cells, cols, cfg)
    region_ids = cells[:, 0] * cols + cells[:, 1]

    if label > 0:
        kind, cls = ("lesion" if cfg.positive_kind == "colocated" else "independent"), label - 1
    else:
        p = None if cfg.decoy_weights is None else np.array(cfg.decoy_weights) / sum(cfg.decoy_weights)
        kind, cls = str(rng.choice(list(cfg.decoys), p=p)), int(rng.integers(len(dirs)))
    size = int(rng.integers(cfg.lesion_regions[0], cfg.lesion_regions[1] + 1))
    fine_at = coarse_at = np.zeros(0, np.int64)
    if kind == "lesion":
        fine_at = coarse_at = _cluster(rng, cells, size)
    elif kind == "fine":
        fine_at = _cluster(rng, cells, size)
    elif kind == "coarse":
        coarse_at = _cluster(rng, cells, size)
    elif kind == "apart":
        fine_at = _cluster(rng, cells, size)
        coarse_at = _cluster(rng, cells, size, exclude=fine_at)
    elif kind == "independent":  # each scale's cluster on its own (they may meet by chance)
        fine_at = _cluster(rng, cells, size)
        coarse_at = _cluster(rng, cells, size)

    z = rng.standard_normal((len(cells), 8))  # tissue context per region
    shift = rng.standard_normal(cfg.dim) * cfg.slide_shift
    pos = {r: j for j, r in enumerate(region_ids.tolist())}
    feats, failed = {}, {}
    for t in MAGS:
        ts = tiles[t]
        ridx = np.array([pos[r] for r in ts.region.tolist()], np.int64)
        x = rng.standard_normal((len(ts), cfg.dim), dtype=np.float32)
        x += (z @ ctx[t])[ridx].astype(np.float32) + shift.astype(np.float32)
        if t == "20x" and len(fine_at):
            hit = np.isin(ridx, fine_at) & (rng.random(len(ts)) < cfg.fine_fraction)
            x[hit] += np.float32(cfg.fine_amp) * dirs[cls, 0].astype(np.float32)
        if t == "5x" and len(coarse_at):
            x[np.isin(ridx, coarse_at)] += np.float32(cfg.coarse_amp) * dirs[cls, 1].astype(np.float32)
        if t == "5x" and cfg.shuffle_coarse:
            x = x[rng.permutation(len(x))]
        bad = rng.random(len(ts)) < cfg.failed_tiles
        x[bad] = 0.0
        feats[t], failed[t] = x.astype(np.float16), bad
    lesion = sorted(set(region_ids[fine_at].tolist()) | set(region_ids[coarse_at].tolist()))
    return SynthSlide(f"syn{i:04d}", patient_id, cfg.classes[label], kind, tiles, feats, failed, lesion)


def assign_slides(cfg: SynthConfig) -> tuple[list[int], list[str], list[str]]:
    """Label index, patient id and split of every slide (a patient's slides share label and split)."""
    rng = np.random.default_rng([cfg.seed, 2**31 + 1])
    n_pos = len(cfg.classes) - 1
    labels, patients, splits = [], [], []
    n_patients = 0
    for i in range(cfg.n_slides):
        if i and rng.random() < cfg.second_slide and patients[-1] != (patients[-2] if i > 1 else None):
            labels.append(labels[-1])
            patients.append(patients[-1])
            splits.append(splits[-1])
            continue
        pos = rng.random() < cfg.positive_fraction
        labels.append(1 + int(rng.integers(n_pos)) if pos else 0)
        patients.append(f"pat{n_patients:04d}")
        splits.append("test" if rng.random() < cfg.test_fraction else "train")
        n_patients += 1
    return labels, patients, splits


def oracle_scores(slide: SynthSlide, cfg: SynthConfig, dirs: np.ndarray | None = None) -> dict[str, float]:
    """Scores of a slide by an observer who knows the evidence directions (for reference AUCs).

    Per region: ``fine`` = mean of the 4 largest projections of its 20x tiles on u_20, divided by
    fine_amp; ``coarse`` = projection of its 5x tile on u_5, divided by coarse_amp (the maximum
    over positive classes). Slide scores: "20x only" = max_r fine, "5x only" = max_r coarse,
    "independent" = max_r fine + max_r coarse (both scales, not co-located), "co-located" =
    max_r min(fine_r, coarse_r) (what the label depends on).
    """
    if dirs is None:
        dirs = _directions(cfg)[1]
    regions = slide.tiles["5x"].region
    r20 = slide.tiles["20x"].region
    best = {"20x only": -np.inf, "5x only": -np.inf, "independent": -np.inf, "co-located": -np.inf}
    for k in range(len(dirs)):
        p20 = slide.feats["20x"].astype(np.float32) @ dirs[k, 0] / cfg.fine_amp
        p5 = slide.feats["5x"].astype(np.float32) @ dirs[k, 1] / cfg.coarse_amp
        fine = np.array([np.sort(p20[r20 == r])[-4:].mean() if (r20 == r).any() else -np.inf for r in regions])
        scores = {"20x only": fine.max(), "5x only": p5.max(), "independent": fine.max() + p5.max(),
                  "co-located": np.minimum(fine, p5).max()}
        best = {key: max(best[key], float(v)) for key, v in scores.items()}
    return best


def write_slide(slide: SynthSlide, path: str | Path, chunk_rows: int = 1024) -> None:
    """The slide's feature store at `path`, through the pipeline's own writer."""
    dims = {t: int(f.shape[1]) for t, f in slide.feats.items()}
    meta = FeatureStoreMeta(slide_id=slide.slide_id, encoder=ENCODER, tiles_sha256=tiles_digest(slide.tiles),
                            extra={"out_dim": dims["20x"], "synthetic_kind": slide.kind})
    writer = FeatureStoreWriter(path, slide.tiles, dims, meta, chunk_rows=chunk_rows)
    try:
        for t in MAGS:
            writer.write(t, 0, slide.feats[t], slide.failed[t])
        writer.finalize()
    finally:
        writer.close()


def make_cohort(out_dir: str | Path, cfg: SynthConfig | None = None, failed_slides: int = 0) -> SynthCohort:
    """Write the cohort's feature stores to `<out_dir>/features/` and its sheet to `<out_dir>/slides.tsv`.

    The last `failed_slides` slides get a failed feature store instead (as extraction records a
    slide it could not process). A complete cohort already at `out_dir` with the same config is
    reused (`<out_dir>/cohort.json` records the config key).
    """
    cfg = cfg or SynthConfig()
    out = Path(out_dir)
    feature_dir = out / "features"
    sheet = out / "slides.tsv"
    marker = out / "cohort.json"
    labels, patients, splits = assign_slides(cfg)
    ids = [f"syn{i:04d}" for i in range(cfg.n_slides)]
    want = {"key": cfg.key(), "failed_slides": failed_slides, "config": asdict(cfg)}
    if marker.exists() and sheet.exists():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("key") == want["key"] and done.get("failed_slides") == failed_slides:
            return SynthCohort(sheet, feature_dir, ids, {s: cfg.classes[k] for s, k in zip(ids, labels)},
                               done["kinds"], list(cfg.classes))
    marker.unlink(missing_ok=True)
    shutil.rmtree(feature_dir, ignore_errors=True)
    feature_dir.mkdir(parents=True, exist_ok=True)
    ctx, dirs = _directions(cfg)
    kinds = {}
    for i, (sid, label, patient) in enumerate(zip(ids, labels, patients)):
        path = feature_dir / f"{sid}.zarr"
        if i >= cfg.n_slides - failed_slides:
            write_failed_store(path, "features", sid, "synthetic failure", {"encoder": ENCODER})
            kinds[sid] = "failed"
            continue
        slide = make_slide(i, cfg, label, patient, ctx, dirs)
        write_slide(slide, path, cfg.chunk_rows)
        kinds[sid] = slide.kind
    header = ["slide_id", "path", "label", "patient_id"] + (["split"] if cfg.test_fraction > 0 else [])
    lines = ["\t".join(header)]
    for sid, label, patient, split in zip(ids, labels, patients, splits):
        row = [sid, f"slides/{sid}.tif", cfg.classes[label], patient] + ([split] if cfg.test_fraction > 0 else [])
        lines.append("\t".join(row))
    sheet.write_text("\n".join(lines) + "\n")
    want["kinds"] = kinds
    marker.write_text(json.dumps(want, indent=1))
    unfinished = [s for s in ids if store_status(feature_dir / f"{s}.zarr") not in ("ok", "failed")]
    if unfinished:  # every slide gets a finished store, or the cohort is not what the tests think
        raise StoreError(f"synthetic cohort {out}: stores of {unfinished[:3]} are not finished")
    return SynthCohort(sheet, feature_dir, ids, {s: cfg.classes[k] for s, k in zip(ids, labels)}, kinds,
                       list(cfg.classes))


def synth_bags(cfg: SynthConfig, n_groups: int) -> tuple[list, list[dict[str, float]]]:
    """Every slide of the cohort as a training bag, in memory, and its oracle scores.

    Bags go through :func:`pipeline.mil.bags.make_bag`, the function that turns a feature store
    into a bag (groups, tile centres), so a model sees exactly what it would see from stores
    written by :func:`write_slide` (tested); only the disk round trip is skipped.
    """
    from pipeline.mil.bags import make_bag

    labels, patients, _ = assign_slides(cfg)
    ctx, dirs = _directions(cfg)
    bags, oracle = [], []
    for i, (label, patient) in enumerate(zip(labels, patients)):
        s = make_slide(i, cfg, label, patient, ctx, dirs)
        keep = {t: ~s.failed[t] for t in MAGS}
        bags.append(make_bag(f"{s.slide_id}-{cfg.seed}", label, {t: s.feats[t][keep[t]] for t in MAGS},
                             {t: s.tiles[t].coords[keep[t]] for t in MAGS},
                             {t: s.tiles[t].region[keep[t]] for t in MAGS}, n_groups))
        oracle.append(oracle_scores(s, cfg, dirs))
    return bags, oracle
