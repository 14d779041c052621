"""Lesion-level evaluation for any cohort with lesion annotations (QuPath GeoJSON / ASAP XML).

Two read-outs, per magnification:
- `linear_probe`: does a feature set separate lesion tiles from normal tiles? A logistic
  regression (sklearn, standardised features) scored by slide-grouped cross-validated ROC AUC,
  so tiles of one slide never sit in both the training and the test part.
- `attention_auc`: does a MIL model's tile attention find the lesions? On each annotated tumour
  slide, the ROC AUC of attention for lesion vs other tiles (from an evaluation's attention.npz).
A tile is lesion when its centre lies in the lesion geometry (`annotations.lesion_geometry`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

from pipeline.mil.bag_arrays import tile_sides

log = logging.getLogger(__name__)


def lesion_tiles(coords: np.ndarray, side: float, lesion: BaseGeometry | None) -> np.ndarray:
    """(N,) bool: the centre of each tile (level-0 top-left `coords`, level-0 `side`) is in `lesion`."""
    if lesion is None or lesion.is_empty or len(coords) == 0:
        return np.zeros(len(coords), bool)
    c = np.asarray(coords, np.float64) + side / 2.0  # (N, 2) centres
    return shapely.contains_xy(lesion, c[:, 0], c[:, 1])


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def probe_data(tiles: Mapping[str, tuple[np.ndarray, np.ndarray, float]], labels: Mapping[str, str],
               lesions: Mapping[str, BaseGeometry], normal_label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, slide) of the tiles with a known truth: every tile of a `normal_label` slide (0)
    and every tile of an annotated slide (1 inside a lesion, else 0). `tiles`: slide ->
    (features (N, D), level-0 coords (N, 2), level-0 tile side)."""
    xs, ys, gs = [], [], []
    for sid, (feats, coords, side) in tiles.items():
        if sid in lesions:
            y = lesion_tiles(coords, side, lesions[sid])
        elif labels.get(sid) == normal_label:
            y = np.zeros(len(coords), bool)
        else:
            continue  # a tumour slide without annotations: its tiles' truth is unknown
        xs.append(feats)
        ys.append(y.astype(int))
        gs.append(np.full(len(y), sid, dtype=object))
    if not xs:
        return np.zeros((0, 0), np.float32), np.zeros(0, int), np.zeros(0, object)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs)


def linear_probe(feature_dirs: Mapping[str, str | Path], labels: Mapping[str, str],
                 lesions: Mapping[str, BaseGeometry], normal_label: str = "normal", folds: int = 5, seed: int = 0,
                 max_tiles_per_slide: int | None = None) -> pd.DataFrame:
    """Slide-grouped CV ROC AUC of a logistic regression, lesion vs normal tiles, per magnification.

    `feature_dirs`: magnification -> folder of `<slide_id>.zarr` feature stores; `labels`: the
    sheet's slide -> label; `lesions`: slide -> lesion geometry (annotated slides only).

    Returns one row per magnification: mag, tiles, lesion_tiles, slides, auc.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.store import read_feature_store

    per_mag: dict[str, dict[str, tuple]] = {m: {} for m in feature_dirs}
    rng = np.random.default_rng(seed)
    for m, d in feature_dirs.items():
        for sid in labels:
            p = Path(d) / f"{sid}.zarr"
            if not p.exists():
                log.warning("%s: no feature store %s; left out of the %s probe", sid, p, m)
                continue
            f = read_feature_store(p, [m])[1][m]
            side = tile_sides({m: f.coords})[m]
            keep = ~f.failed
            if max_tiles_per_slide and keep.sum() > max_tiles_per_slide:
                idx = rng.choice(np.flatnonzero(keep), max_tiles_per_slide, replace=False)
                keep = np.zeros_like(keep)
                keep[idx] = True
            per_mag[m][sid] = (f.features[keep].astype(np.float32), f.coords[keep], side)
    out = []
    for m in feature_dirs:
        x, y, groups = probe_data(per_mag[m], labels, lesions, normal_label)
        row = {"mag": m, "tiles": len(y), "lesion_tiles": int(y.sum()),
               "slides": len(set(groups)), "auc": float("nan")}
        has = pd.Series(y).groupby(groups).max().value_counts()  # slides with / without lesion tiles
        k = min(folds, int(has.min()) if len(has) == 2 else 0)
        if k < 2:
            log.warning("%s: too few slides with and without lesion tiles for a %d-fold probe", m, folds)
            out.append(row)
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        prob = cross_val_predict(clf, x, y, groups=groups, cv=cv, method="predict_proba")[:, 1]
        row["auc"] = _auc(y, prob)
        out.append(row)
    return pd.DataFrame(out)


def attention_auc(attention_files: Mapping[str, list[str | Path]],
                  lesions: Mapping[str, BaseGeometry]) -> pd.DataFrame:
    """Per model, slide and magnification: ROC AUC of tile attention, lesion vs other tiles.

    `attention_files`: model -> attention.npz files (e.g. one per fold; each test slide once).
    Slides without a lesion in `lesions` are skipped (no positives).
    """
    from pipeline.report.heatmap import load_attention

    rows = []
    for model, files in attention_files.items():
        for f in files:
            for sid, per_mag in load_attention(f).items():
                geom = lesions.get(sid)
                if geom is None or geom.is_empty:
                    continue
                sides = tile_sides({m: c for m, (_, c) in per_mag.items()})
                for mag, (attn, coords) in per_mag.items():
                    y = lesion_tiles(coords, sides[mag], geom)
                    rows.append({"model": model, "file": str(f), "slide": sid, "mag": mag, "tiles": len(y),
                                 "lesion_tiles": int(y.sum()), "auc": _auc(y, np.asarray(attn, np.float64))})
    return pd.DataFrame(rows, columns=["model", "file", "slide", "mag", "tiles", "lesion_tiles", "auc"])


def summarize_attention(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and count) of the per-slide attention AUCs per model and magnification."""
    if table.empty:
        return pd.DataFrame(columns=["model", "mag", "slides", "mean_auc", "median_auc"])
    g = table.dropna(subset=["auc"]).groupby(["model", "mag"], sort=False)["auc"]
    return g.agg(slides="count", mean_auc="mean", median_auc="median").reset_index()


def plot_lesion_auc(table: pd.DataFrame, probe: pd.DataFrame | None, out: str | Path) -> int:
    """Per magnification: each model's per-slide attention AUC (box and points; 0.5 = attention
    blind to the lesion) and the features' linear-probe AUC (what attention could
    reach on these features), as a dotted line. Returns how many (model, magnification) boxes it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.atomic import atomic_path
    from pipeline.mil.models.config import order_magnifications

    t = table.dropna(subset=["auc"])
    mags = order_magnifications(list(dict.fromkeys(list(t["mag"]) + list(probe["mag"] if probe is not None else []))))
    models = list(dict.fromkeys(t["model"]))
    fig, ax = plt.subplots(figsize=(min(14.0, 3.5 + 0.4 * max(1, len(mags)) * max(1, len(models))), 4.2), dpi=110)
    width = 0.8 / max(1, len(models))
    colors = plt.get_cmap("tab10").colors
    rng = np.random.default_rng(0)  # jitter of the points only
    n_slides = t.groupby("model")["slide"].nunique()
    drawn, labelled = 0, set()  # models already in the legend
    probe_label = "linear probe of the features (tiles)"  # on the first probe line only
    for i, mag in enumerate(mags):
        if probe is not None and (p := probe.loc[probe["mag"] == mag, "auc"]).notna().any():
            ax.hlines(float(p.iloc[0]), i - 0.45, i + 0.45, colors="0.25", lw=2, linestyles=":", zorder=4,
                      label=probe_label)
            probe_label = None
        for j, model in enumerate(models):
            v = t.loc[(t["model"] == model) & (t["mag"] == mag), "auc"].to_numpy(float)
            if not len(v):
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.boxplot([v], positions=[x], widths=width * 0.8, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": (*colors[j % 10], 0.35)}, medianprops={"color": "k"})
            ax.scatter(x + rng.uniform(-width / 5, width / 5, len(v)), v, s=9, color=colors[j % 10], zorder=3,
                       label=None if model in labelled else f"{model} attention ({n_slides[model]} slides)")
            labelled.add(model)
            drawn += 1
    ax.axhline(0.5, ls="--", c="grey", lw=1)
    ax.text(-0.45, 0.5, " chance", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(range(len(mags)), mags)
    ax.set(ylim=(0, 1.02), ylabel="ROC AUC, lesion vs other tiles",
           title="Does attention find the lesions? (annotated tumour slides)")
    if not drawn:
        ax.text(0.5, 0.5, "no annotated slide with lesion and other tiles", ha="center", va="center",
                transform=ax.transAxes)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return drawn
