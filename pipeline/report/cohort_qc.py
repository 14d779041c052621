"""Cohort feature QC with Dask: per-slide feature statistics, a cohort PCA, outlier slides and a
batch-effect score, before any AUC is trusted.

Every feature store is opened lazily (:func:`pipeline.store.open_features_dask`) and reduced
chunk by chunk to its slide's mean and spread (RMS distance of its tiles to that mean), a
bounded number of stores per Dask compute: memory does not grow with the cohort beyond one
(slides x D) table of means. The PCA of the slide means is Dask's randomised SVD
(`dask.array.linalg.svd_compressed`, out of core). A slide is an outlier when its mean's
distance to the cohort's (in the leading components, each scaled by its MAD) has a robust
z-score (median / MAD) above `outlier_z`; slides with no or very few tiles, and failed stores, are
listed loudly: a common silent failure elsewhere. With a `site` column (hospital, scanner),
the batch-effect score is how well a cross-validated linear classifier (shrinkage LDA) predicts
the site from the slide means (balanced accuracy; chance = 1 / sites), with a permutation p-value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_json, write_tsv
from pipeline.errors import SlideError
from pipeline.slides.sheet import SlideRow
from pipeline.store import open_features_dask, store_state

log = logging.getLogger(__name__)


@dataclass
class QCConfig:
    min_tiles: int = 16  # fewer usable tiles than this at the finest magnification (a quarter as many one coarser, ...): "few tiles"
    outlier_z: float = 3.5  # robust z-score of a slide mean's distance to the cohort's beyond which it is an outlier
    n_components: int = 10  # leading principal components for distances and the batch score
    stores_per_compute: int = 32  # feature stores reduced per Dask compute (bounds memory, not the cohort)
    workers: int = 1  # Dask threads
    permutations: int = 200  # label permutations for the batch-effect p-value
    batch_alpha: float = 0.01  # a batch effect is flagged when the permutation p-value is below this
    seed: int = 0  # randomised SVD, CV folds and permutations


@dataclass
class MagStats:
    slide_ids: list[str]
    n_tiles: np.ndarray  # (S,) usable tiles (not failed to decode); -1 = store failed / missing
    means: Any  # (S, D) float32 slide means on disk (a Zarr array; NaN rows where n_tiles <= 0)
    mean_norm: np.ndarray  # (S,) length of each slide's mean
    spread: np.ndarray  # (S,) RMS distance of a slide's tiles to its mean
    problems: dict[str, str] = field(default_factory=dict)  # slide -> why its store could not be read


def _chunk_sums(f: np.ndarray, failed: np.ndarray) -> np.ndarray:
    """(1, 2 D + 1): sum, sum of squares and count of one chunk's usable rows."""
    x = f[~failed[:, 0]].astype(np.float64)  # (n, D)
    return np.concatenate([x.sum(0), (x * x).sum(0), [len(x)]])[None]


def _reductions(path: Path, mags: list[str]) -> dict[str, Any]:
    """mag -> lazy (2 D + 1,) [sum, sum of squares, usable count] of one store's features, one
    task per stored chunk and a sum: nothing else is held."""
    import dask.array as da

    out = {}
    for mag, (f, failed) in open_features_dask(path, mags).items():
        d = f.shape[1]
        if f.shape[0] == 0:
            out[mag] = np.zeros(2 * d + 1)
            continue
        parts = da.map_blocks(_chunk_sums, f, failed.rechunk((f.chunks[0],))[:, None], dtype=np.float64,
                              chunks=((1,) * len(f.chunks[0]), (2 * d + 1,)))
        out[mag] = parts.sum(0)
    return out


def min_tiles_at(mags: list[str], min_tiles: int) -> dict[str, int]:
    """`min_tiles` at the finest magnification, a quarter of it one magnification coarser (a
    tile there covers 2 x 2), ...: the same tissue area at every magnification."""
    return {m: max(1, math.ceil(min_tiles / 4**i)) for i, m in enumerate(mags)}


def feature_stats(rows: list[SlideRow], feature_dirs: dict[str, Path], cfg: QCConfig,
                  scratch: str | Path) -> dict[str, MagStats]:
    """Per magnification: every slide's usable tile count, feature mean and spread. Stores are
    reduced `cfg.stores_per_compute` at a time (all their magnifications in one Dask compute);
    the slide means go to an (S, D) Zarr table under `scratch`, one block per batch, so memory
    holds one batch of them whatever the cohort's size."""
    import dask
    import zarr
    from tqdm import tqdm

    ids = [r.slide_id for r in rows]
    mags = list(feature_dirs)
    by_dir: dict[Path, list[str]] = {}
    for m, d in feature_dirs.items():
        by_dir.setdefault(Path(d), []).append(m)
    step = cfg.stores_per_compute
    n = {m: np.full(len(ids), -1, np.int64) for m in mags}
    norm = {m: np.full(len(ids), np.nan) for m in mags}
    spread = {m: np.full(len(ids), np.nan) for m in mags}
    means: dict[str, Any] = {}
    problems: dict[str, dict[str, str]] = {m: {} for m in mags}
    bar = tqdm(total=len(ids), desc="cohort QC", unit="slide", mininterval=15.0, disable=None)
    for start in range(0, len(ids), step):
        stop = min(len(ids), start + step)
        lazy, where = [], []
        for i in range(start, stop):
            for d, dmags in by_dir.items():
                p = d / f"{ids[i]}.zarr"
                status, attrs = store_state(p)
                why = None
                if status != "ok":
                    why = f"feature store {status}: " + (str(attrs.get("error", "")) if status == "failed" else str(p))
                else:
                    try:
                        lazy.append(_reductions(p, dmags))
                        where.append(i)
                    except SlideError as e:
                        why = e.cause
                for m in dmags if why else []:
                    problems[m][ids[i]] = why
        done = dask.compute(*lazy, scheduler="threads" if cfg.workers > 1 else "sync", num_workers=cfg.workers)
        block: dict[str, np.ndarray] = {}
        for i, per_mag in zip(where, done):
            for m, v in per_mag.items():
                d = (len(v) - 1) // 2
                if m not in means:
                    means[m] = zarr.create_array(str(Path(scratch) / f"means_{m}.zarr"), shape=(len(ids), d),
                                                 chunks=(step, d), dtype=np.float32, fill_value=np.nan)
                block.setdefault(m, np.full((stop - start, d), np.nan, np.float32))
                n[m][i] = int(v[-1])
                if n[m][i] > 0:
                    mu = v[:d] / n[m][i]
                    block[m][i - start] = mu
                    norm[m][i] = float(np.linalg.norm(mu))
                    spread[m][i] = math.sqrt(max(0.0, float((v[d : 2 * d] / n[m][i] - mu**2).sum())))
        for m, b in block.items():
            means[m][start:stop] = b  # one chunk per batch
        bar.update(stop - start)
    bar.close()
    return {m: MagStats(ids, n[m], means.get(m), norm[m], spread[m], problems[m]) for m in mags}


def pca_scores(means: Any, rows: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(scores (len(rows), k), explained variance ratio (k,)) of the centred slide means `rows`
    of the on-disk (S, D) table, by Dask's randomised SVD, out of core (read in row blocks)."""
    import dask.array as da

    x = da.from_zarr(means)[rows].astype(np.float64)  # (S', D)
    k = max(1, min(k, len(rows) - 1, x.shape[1]))
    centred = x - x.mean(0)
    u, s, _ = da.linalg.svd_compressed(centred, k=k, n_power_iter=4, seed=seed)
    u, s, total = da.compute(u, s, (centred**2).sum())
    sign = np.sign(u[np.abs(u).argmax(0), range(u.shape[1])])  # deterministic sign per component
    return u * s * sign, s**2 / (float(total) or 1.0)


def robust_scale(x: np.ndarray) -> np.ndarray:
    """Columns centred on their median and divided by 1.4826 MAD (their std where MAD is 0): an
    outlier cannot shrink its own coordinate, as dividing by a std it inflates would."""
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    scale = np.where(mad > 0, mad, x.std(0))
    return (x - med) / np.where(scale > 0, scale, 1.0)


def robust_z(d: np.ndarray) -> np.ndarray:
    """(d - median) / (1.4826 MAD): a z-score that a few outliers cannot hide behind."""
    med = np.median(d)
    mad = 1.4826 * np.median(np.abs(d - med))
    return (d - med) / (mad if mad > 0 else (np.std(d) or 1.0))


def batch_effect(x: np.ndarray, sites: np.ndarray, cfg: QCConfig) -> dict[str, Any]:
    """How well the site is predicted from slide-level features: cross-validated balanced accuracy
    of a linear classifier (LDA with Ledoit-Wolf shrinkage), with a permutation p-value."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, permutation_test_score

    values, counts = np.unique(sites, return_counts=True)
    out: dict[str, Any] = {"sites": {str(v): int(c) for v, c in zip(values, counts)}, "score": math.nan,
                           "chance": 1 / len(values) if len(values) else math.nan, "p_value": math.nan, "flagged": False}
    if len(values) < 2:
        out["note"] = f"one site only ({values[0] if len(values) else 'none'}): no batch-effect score"
        return out
    if counts.min() < 2:
        out["note"] = f"site {values[counts.argmin()]} has {counts.min()} slide: no cross-validated score"
        return out
    cv = StratifiedKFold(n_splits=int(min(5, counts.min())), shuffle=True, random_state=cfg.seed)
    clf = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")  # closed form: cheap to permute
    score, _, p = permutation_test_score(clf, x, sites, cv=cv, scoring="balanced_accuracy",
                                        n_permutations=cfg.permutations, random_state=cfg.seed, n_jobs=1)
    out.update(score=float(score), p_value=float(p), flagged=bool(p < cfg.batch_alpha),
               method=f"shrinkage LDA on {x.shape[1]} robustly scaled slide-mean PCs, {cv.n_splits}-fold CV, "
                      f"{cfg.permutations} permutations")
    return out


def cohort_qc(rows: list[SlideRow], feature_dirs: dict[str, Path], out_dir: str | Path,
              cfg: QCConfig | None = None) -> dict[str, Any]:
    """Write cohort_features.tsv, cohort_outliers.tsv, cohort_qc.json and cohort_pca.svg to `out_dir`
    (SVG: a `<slide>.png` beside it is a slide's QC picture)."""
    import tempfile

    cfg = cfg or QCConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cohort_qc-", dir=out_dir) as scratch:
        return _cohort_qc(rows, feature_stats(rows, feature_dirs, cfg, scratch), out_dir, cfg)


def _cohort_qc(rows: list[SlideRow], stats: dict[str, MagStats], out_dir: Path, cfg: QCConfig) -> dict[str, Any]:
    labels = {r.slide_id: r.label or "" for r in rows}
    sites = {r.slide_id: r.site or "" for r in rows}
    table, listed, pcs, pc_frames = [], [], {}, []
    floor = min_tiles_at(list(stats), cfg.min_tiles)
    for mag, st in stats.items():
        ok = st.n_tiles >= floor[mag]
        scores = np.full((len(st.slide_ids), 2), np.nan)
        z = np.full(len(st.slide_ids), np.nan)
        explained = np.array([])
        if ok.sum() >= 3:
            sc, explained = pca_scores(st.means, np.flatnonzero(ok), cfg.n_components, cfg.seed)
            white = robust_scale(sc)
            z[ok] = robust_z(np.linalg.norm(white, axis=1))
            scores[ok, : min(2, sc.shape[1])] = sc[:, :2]
            pc_frames.append(pd.DataFrame(white, index=np.array(st.slide_ids)[ok]).add_prefix(f"{mag}_pc"))
        pcs[mag] = (scores, explained)
        for i, sid in enumerate(st.slide_ids):
            n = int(st.n_tiles[i])
            table.append({"slide_id": sid, "label": labels[sid], "site": sites[sid], "mag": mag, "n_tiles": n,
                          "mean_norm": st.mean_norm[i],
                          "spread": st.spread[i], "pc1": scores[i, 0], "pc2": scores[i, 1], "robust_z": z[i]})
            if sid in st.problems:
                listed.append((sid, mag, "failed store", n, math.nan, st.problems[sid]))
            elif n == 0:
                listed.append((sid, mag, "no tiles", n, math.nan, "no usable tile at this magnification"))
            elif n < floor[mag]:
                listed.append((sid, mag, "few tiles", n, math.nan, f"{n} usable tiles (< {floor[mag]})"))
            elif z[i] > cfg.outlier_z:
                listed.append((sid, mag, "outlier", n, z[i], f"mean's distance to the cohort's: robust z {z[i]:.1f} > {cfg.outlier_z}"))
    outliers = pd.DataFrame(listed, columns=["slide_id", "mag", "reason", "n_tiles", "robust_z", "detail"])
    for r in outliers.itertuples():
        log.warning("cohort QC: %s %s: %s: %s", r.slide_id, r.mag, r.reason.upper(), r.detail)
    batch: dict[str, Any] = {"note": "no site column"}
    if any(sites.values()):
        x = pd.concat(pc_frames, axis=1, join="inner") if pc_frames else pd.DataFrame()
        x = x[[sites[s] != "" for s in x.index]]
        batch = batch_effect(x.to_numpy(), np.array([sites[s] for s in x.index]), cfg)
        if "note" in batch:
            log.warning("cohort QC: site column: %s", batch["note"])
        else:
            log.info("cohort QC: batch effect: site predicted with balanced accuracy %.3f (chance %.3f, p = %.3g)%s",
                     batch["score"], batch["chance"], batch["p_value"], ", FLAGGED" if batch["flagged"] else "")
    summary = {"slides": len(rows), "listed": len(outliers), "outliers": int((outliers["reason"] == "outlier").sum()),
               "batch_effect": batch, "explained_variance": {m: pcs[m][1][:2].tolist() for m in pcs},
               "config": asdict(cfg)}
    write_tsv(out_dir / "cohort_features.tsv", pd.DataFrame(table))
    write_tsv(out_dir / "cohort_outliers.tsv", outliers)
    plot_pca(pd.DataFrame(table), outliers, pcs, batch, out_dir / "cohort_pca.svg")
    write_json(out_dir / "cohort_qc.json", summary)
    return summary


def plot_pca(table: pd.DataFrame, outliers: pd.DataFrame, pcs: dict[str, tuple], batch: dict[str, Any],
             out: str | Path) -> None:
    """Slide means on PC1/PC2, one row per magnification, coloured by label and (if any) by site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mags = list(pcs)
    by = ["label"] + (["site"] if (table["site"] != "").any() else [])
    fig, axes = plt.subplots(max(1, len(mags)), len(by), figsize=(4.6 * len(by), 4.0 * max(1, len(mags))),
                             dpi=110, squeeze=False)
    flagged = set(zip(outliers["slide_id"], outliers["mag"])) if len(outliers) else set()
    for r, mag in enumerate(mags):
        t = table[(table["mag"] == mag) & table["pc1"].notna()]
        ev = pcs[mag][1]
        for c, col in enumerate(by):
            ax = axes[r][c]
            for k, (value, g) in enumerate(t.groupby(col)):
                ax.scatter(g["pc1"], g["pc2"], s=14, alpha=0.8, color=plt.cm.tab10(k % 10), label=value or "unknown")
            out_t = t[np.array([(s, mag) in flagged for s in t["slide_id"]], dtype=bool)]
            ax.scatter(out_t["pc1"], out_t["pc2"], s=60, facecolors="none", edgecolors="black", lw=1.2,
                       label="outlier" if len(out_t) else None)
            for s, x, y in out_t[["slide_id", "pc1", "pc2"]].itertuples(index=False):
                ax.annotate(s, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            pc = [f"{100 * v:.0f} %" for v in ev[:2]] + ["", ""]
            ax.set(xlabel=f"PC1 ({pc[0]})", ylabel=f"PC2 ({pc[1]})", title=f"{mag}: slide means by {col}")
            ax.legend(fontsize=7, frameon=False, markerscale=1.2)
            ax.grid(alpha=0.3)
    score = batch.get("score", math.nan)
    title = "cohort feature PCA"
    if isinstance(score, float) and math.isfinite(score):
        title += (f" | site predicted from slide means: balanced accuracy {score:.2f} (chance {batch['chance']:.2f},"
                  f" p = {batch['p_value']:.3g}){' BATCH EFFECT' if batch['flagged'] else ''}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
