"""Apply a trained run to new slides: the k fold models as an ensemble, external validation.

Every slide's stores are first checked against the run's recorded contract
(:mod:`pipeline.deploy.trained_run`): features from another encoder or weights, or tiles cut with
other parameters, are refused with one line naming the slide and the mismatch, and the rest of
the cohort goes on. Each slide is predicted alone (batch of one), so its probability never
depends on which other slides are in the cohort. The ensemble probability is the mean of the
folds' probabilities; each fold's is kept beside it. With labels in the sheet, metrics come with
patient-level bootstrap 95 % confidence intervals (:func:`bootstrap_ci`; slides of one patient
are resampled together).

Outputs per model (`<out>/<model>/`): predictions.csv, attention.npz (fold-mean tile attention,
same keys as an evaluation's), metrics.json, refused.tsv, scores.png (ROC and score histogram),
heatmaps/<slide>.png.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path, write_json, write_tsv
from pipeline.deploy.trained_run import TrainedRun, feature_mismatch, tiling_mismatch
from pipeline.mil.metrics import METRICS, classification_metrics, fast_metrics
from pipeline.mil.stats import patient_bootstrap
from pipeline.slides.sheet import SlideRow
from pipeline.store import read_attrs, store_state

log = logging.getLogger(__name__)


def encoder_dir(name: str) -> str:
    """Folder of an encoder's feature stores (`timm:x` -> `timm-x`), as the workflow names it."""
    return name.replace(":", "-")


@dataclass
class PredictConfig:
    n_bootstrap: int = 2000  # patient-level bootstrap resamples for the 95 % CIs (0 = none)
    seed: int = 0  # bootstrap seed (and torch's)
    device: str = "cpu"  # cpu, auto, cuda, ...
    chunk_slides: int = 8  # slides loaded at once (each is predicted by every fold, then dropped)
    heatmap_slides: tuple[str, ...] = ()  # slides always drawn
    heatmap_n: int = 4  # plus this many, the most confident of each predicted class in turn


# --------------------------------------------------------------------------- checks


def check_slide(run: TrainedRun, slide_id: str, feature_dirs: dict[str, Path],
                tiles_dir: Path | None) -> tuple[str, str] | None:
    """(kind, detail) when the slide cannot be predicted: kind "failed" (an earlier stage failed
    or a store is missing) or "mismatch" (its stores disagree with the trained run); else None."""
    tile_sha = None
    if tiles_dir is not None:
        status, attrs = store_state(tiles_dir / f"{slide_id}.zarr")
        if status == "failed":
            return "failed", f"tiling failed: {attrs.get('error', '')}"
        if status != "ok":
            return "failed", f"tile store {status}: {tiles_dir / f'{slide_id}.zarr'}"
        why = tiling_mismatch(run, attrs.get("tiling") or {})
        if why:
            return "mismatch", why
        tile_sha = attrs.get("tiles_sha256")
    for mag in run.mags:
        p = feature_dirs[mag] / f"{slide_id}.zarr"
        status, attrs = store_state(p)
        if status == "failed":
            return "failed", f"feature extraction failed: {attrs.get('error', '')}"
        if status != "ok":
            return "failed", f"feature store {status}: {p}"
        if mag not in attrs.get("magnifications", []):
            return "mismatch", f"{p} has no {mag} features"
        why = feature_mismatch(run, mag, attrs)
        if why:
            return "mismatch", why
        if tile_sha is not None and attrs.get("tiles_sha256") != tile_sha:
            return "mismatch", f"{mag} features were extracted from other tiles than {tiles_dir / slide_id}.zarr holds"
    return None


# --------------------------------------------------------------------------- statistics


def bootstrap_ci(y: np.ndarray, prob: np.ndarray, patients: np.ndarray, classes: list[str],
                 n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile CIs of :data:`pipeline.mil.metrics.METRICS`, resampling PATIENTS with replacement
    (:func:`pipeline.mil.stats.patient_bootstrap`). A resample with one class only has no AUC and is
    skipped for it; a metric undefined on more than half of the resamples has no CI (NaN)."""
    y = np.asarray(y, dtype=np.int64)

    def stat(idx: np.ndarray) -> list[float]:
        m = fast_metrics(y[idx], prob[idx], len(classes))
        return [m[k] for k in METRICS]

    low, high = patient_bootstrap(np.asarray(patients), stat, n_resamples=n_boot, confidence=level, seed=seed)
    return {k: [float(low[i]), float(high[i])] for i, k in enumerate(METRICS)}


# --------------------------------------------------------------------------- prediction


def ensemble_predict(run: TrainedRun, model_name: str, slide_ids: list[str], feature_dirs: dict[str, Path],
                     cfg: PredictConfig) -> tuple[list[str], np.ndarray, dict[str, np.ndarray], dict[str, dict[str, tuple]], dict[str, str]]:
    """(slides predicted, mean probability (S, C), fold -> probability (S, C), slide -> mag ->
    (fold-mean attention, coords), slide -> why it could not be loaded)."""
    import torch

    from pipeline.errors import SlideError
    from pipeline.mil.bags import BagCache
    from pipeline.mil.train import load_model, predict, seed_everything

    seed_everything(cfg.seed)
    ckpts = [torch.load(p, map_location="cpu", weights_only=False) for p in run.models[model_name]]
    models = [load_model(ck, cfg.device) for ck in ckpts]
    n_groups = ckpts[0]["model_config"]["n_groups"]
    fold_probs: dict[str, list[np.ndarray]] = {f: [] for f in run.folds}
    attention: dict[str, dict[str, tuple]] = {}
    done: list[str] = []
    unusable: dict[str, str] = {}
    stores = {s: {m: feature_dirs[m] / f"{s}.zarr" for m in run.mags} for s in slide_ids}
    from tqdm import tqdm

    bar = tqdm(total=len(slide_ids), desc=f"predict {model_name}", unit="slide", file=sys.stdout,
               mininterval=1.0 if sys.stdout.isatty() else 15.0)
    for start in range(0, len(slide_ids), cfg.chunk_slides):
        chunk = slide_ids[start : start + cfg.chunk_slides]
        n_chunk = len(chunk)
        cache = BagCache({s: stores[s] for s in chunk}, {s: 0 for s in chunk}, n_groups)  # labels unused
        for s in list(chunk):  # load first: a slide without usable tiles is left out, not fatal
            try:
                cache[s]
            except SlideError as e:
                unusable[s] = e.cause
        chunk = [s for s in chunk if s not in unusable]
        done += chunk
        summed: dict[str, dict[str, np.ndarray]] = {}
        for fold, model in zip(run.folds, models):
            if not chunk:
                continue
            res = predict(model, cache, chunk, run.mags, batch_size=1, prefetch=1)
            fold_probs[fold].append(res["prob"])
            for sid, per_mag in res["tile_attention"].items():
                for t, a in per_mag.items():
                    acc = summed.setdefault(sid, {})
                    acc[t] = acc[t] + a if t in acc else a.astype(np.float64)
        for sid, per_mag in summed.items():
            attention[sid] = {t: ((a / len(models)).astype(np.float32), cache[sid].coords[t]) for t, a in per_mag.items()}
        bar.update(n_chunk)
    bar.close()
    empty = np.zeros((0, len(run.classes)))
    per_fold = {f: np.concatenate(v) if v else empty for f, v in fold_probs.items()}
    mean = np.mean(np.stack(list(per_fold.values())), axis=0)  # (S, C)
    return done, mean, per_fold, attention, unusable


def predictions_table(rows: list[SlideRow], classes: list[str], mean: np.ndarray,
                      per_fold: dict[str, np.ndarray]) -> pd.DataFrame:
    """slide_id, patient_id, label (empty when unknown), pred, prob_<class>, <fold>_prob_<class>."""
    df = pd.DataFrame({"slide_id": [r.slide_id for r in rows], "patient_id": [r.patient_id for r in rows],
                       "label": [r.label or "" for r in rows],
                       "pred": [classes[i] for i in mean.argmax(1)] if len(rows) else []})
    for c, name in enumerate(classes):
        df[f"prob_{name}"] = mean[:, c]
    for fold, p in per_fold.items():
        for c, name in enumerate(classes):
            df[f"{fold}_prob_{name}"] = p[:, c]
    return df


def external_metrics(pred: pd.DataFrame, classes: list[str], folds: list[str], cfg: PredictConfig) -> dict[str, Any]:
    """Ensemble metrics with patient-level bootstrap CIs, and each fold model's own, on labelled slides."""
    lab = pred[pred["label"] != ""]
    out: dict[str, Any] = {"n_labelled": len(lab)}
    if not len(lab):
        return out | {k: math.nan for k in METRICS}
    y = np.array([classes.index(v) for v in lab["label"]])
    prob = lab[[f"prob_{c}" for c in classes]].to_numpy()
    out.update(classification_metrics(y, prob, classes))
    if cfg.n_bootstrap:
        ci = bootstrap_ci(y, prob, lab["patient_id"].to_numpy(), classes, cfg.n_bootstrap, cfg.seed)
        out.update({f"{k}_ci95": v for k, v in ci.items()})
    out["per_fold"] = {f: classification_metrics(y, lab[[f"{f}_prob_{c}" for c in classes]].to_numpy(), classes)
                       for f in folds}
    out["bootstrap"] = {"resamples": cfg.n_bootstrap, "unit": "patient", "level": 0.95, "seed": cfg.seed,
                        "method": "percentile"}
    return out


def plot_scores(pred: pd.DataFrame, classes: list[str], folds: list[str], metrics: dict[str, Any],
                out: str | Path, title: str = "") -> None:
    """ROC of the ensemble (folds thin) when labelled, and the histogram of the positive class's score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    pos = classes[-1]
    lab = pred[pred["label"] != ""]
    binary = len(classes) == 2 and lab["label"].nunique() == 2
    fig, axes = plt.subplots(1, 2 if binary else 1, figsize=(9 if binary else 4.5, 4.2), dpi=120, squeeze=False)
    if binary:
        ax = axes[0][0]
        y = (lab["label"] == pos).to_numpy()
        for f in folds:
            fpr, tpr, _ = roc_curve(y, lab[f"{f}_prob_{pos}"])
            ax.plot(fpr, tpr, lw=0.8, alpha=0.5, color="grey")
        fpr, tpr, _ = roc_curve(y, lab[f"prob_{pos}"])
        lo, hi = metrics.get("auc_ci95", [math.nan, math.nan])
        ax.plot(fpr, tpr, lw=2, color="C3", label=f"ensemble AUC {metrics['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
        ax.plot([], [], lw=0.8, color="grey", label=f"{len(folds)} fold models")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC, {len(lab)} labelled slides")
        ax.legend(loc="lower right", fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    bins = np.linspace(0, 1, 21)
    groups = [(g, d) for g, d in pred.groupby("label")] if len(lab) else [("", pred)]
    for g, d in groups:
        ax.hist(d[f"prob_{pos}"], bins=bins, alpha=0.6, label=g or "unlabelled")
    ax.set(xlabel=f"ensemble P({pos})", ylabel="slides", title="scores")
    ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def pick_heatmap_slides(pred: pd.DataFrame, classes: list[str], wanted: tuple[str, ...], n: int) -> list[str]:
    """The wanted slides that were predicted, then the most confident of each predicted class in turn."""
    out = [s for s in wanted if s in set(pred["slide_id"])]
    queues = [pred[pred["pred"] == c].sort_values(f"prob_{c}", ascending=False, kind="stable")["slide_id"].tolist()
              for c in reversed(classes)]
    queues = [[s for s in q if s not in out] for q in queues]
    extra: list[str] = []
    while len(extra) < n and any(queues):
        for q in queues:
            if q and len(extra) < n:
                extra.append(q.pop(0))
    return out + extra


def write_model_outputs(run: TrainedRun, model_name: str, rows: list[SlideRow], refused: list[dict[str, str]],
                        feature_dirs: dict[str, Path], tiles_dir: Path | None, out_dir: str | Path,
                        cfg: PredictConfig) -> dict[str, Any]:
    """Predict `rows` (already checked) with one model's folds and write every output; returns metrics."""
    out_dir = Path(out_dir)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    ids, mean, per_fold, attention, unusable = ensemble_predict(run, model_name, [r.slide_id for r in rows],
                                                                feature_dirs, cfg)
    for sid, why in unusable.items():
        log.warning("%s: not predicted (failed): %s", sid, why)
    refused = refused + [{"slide_id": s, "kind": "failed", "detail": why} for s, why in unusable.items()]
    rows = [r for r in rows if r.slide_id not in unusable]
    pred = predictions_table(rows, run.classes, mean, per_fold)
    metrics = {"model": model_name, "n_slides": len(ids), "n_refused": len(refused),
               **external_metrics(pred, run.classes, run.folds, cfg), "trained_run": run.describe()}
    with atomic_path(out_dir / "predictions.csv") as tmp:
        pred.to_csv(tmp, index=False)
    write_tsv(out_dir / "refused.tsv", pd.DataFrame(refused, columns=["slide_id", "kind", "detail"]))
    arrays = {}
    for sid, per_mag in attention.items():
        for t, (a, xy) in per_mag.items():
            arrays[f"{sid}|{t}|attention"], arrays[f"{sid}|{t}|coords"] = a, xy
    with atomic_path(out_dir / "attention.npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    plot_scores(pred, run.classes, run.folds, metrics, out_dir / "scores.png", title=f"{model_name} on {len(ids)} new slides")
    if tiles_dir is not None:
        from pipeline.report.heatmap import render_heatmap

        for sid in pick_heatmap_slides(pred, run.classes, cfg.heatmap_slides, cfg.heatmap_n):
            a = read_attrs(tiles_dir / f"{sid}.zarr")
            row = pred.set_index("slide_id").loc[sid]
            probs = ", ".join(f"P({c})={row[f'prob_{c}']:.2f}" for c in run.classes)
            render_heatmap(a["slide_path"], attention[sid], a["tile_px_level0"], out_dir / "heatmaps" / f"{sid}.png",
                           title=f"{sid}  label {row['label'] or '?'}  {probs} ({len(run.folds)}-fold ensemble)",
                           mpp=a["base_mpp"])
    write_json(out_dir / "metrics.json", metrics)  # last: marks it done
    return metrics


def predict_cohort(run: TrainedRun, rows: list[SlideRow], results: str | Path, out: str | Path,
                   models: list[str] | None = None, cfg: PredictConfig | None = None) -> dict[str, dict[str, Any]]:
    """Check every slide's stores under `results` (tiles/, features/<encoder>/) against the run,
    then predict the accepted ones with each model into `<out>/<model>/`; returns model -> metrics."""
    cfg = cfg or PredictConfig()
    results = Path(results)
    feature_dirs = {m: results / "features" / encoder_dir(e) for m, e in run.encoders.items()}
    tiles_dir = results / "tiles"
    tiles_dir = tiles_dir if tiles_dir.is_dir() else None
    if tiles_dir is None:
        log.warning("%s: no tiles/ folder: tiling parameters are not checked and no heatmaps are drawn", results)
    accepted, refused = [], []
    for r in rows:
        bad = check_slide(run, r.slide_id, feature_dirs, tiles_dir)
        if bad is None:
            accepted.append(r)
            continue
        refused.append({"slide_id": r.slide_id, "kind": bad[0], "detail": bad[1]})
        if bad[0] == "mismatch":
            print(f"refused: {r.slide_id}: {bad[1]}", file=sys.stderr)
        log.warning("%s: not predicted (%s): %s", r.slide_id, bad[0], bad[1])
    log.info("%d of %d slides match the trained run %s (%s)", len(accepted), len(rows), run.root, run.feature_set)
    out_metrics = {}
    for m in models or sorted(run.models):
        if m not in run.models:
            log.error("model %s is not usable in the trained run: %s", m, run.left_out.get(m, "not trained"))
            continue
        out_metrics[m] = write_model_outputs(run, m, accepted, refused, feature_dirs, tiles_dir, Path(out) / m, cfg)
        mm = out_metrics[m]
        ci = mm.get("auc_ci95", [math.nan, math.nan])
        log.info("%s: %d slides predicted, AUC %.3f [%.3f, %.3f] on %d labelled", m, mm["n_slides"],
                 mm.get("auc", math.nan), ci[0], ci[1], mm["n_labelled"])
    return out_metrics


def summarize_predictions(metric_files: list[str | Path]) -> pd.DataFrame:
    """One row per model: slides predicted / refused, metrics with their 95 % CIs."""
    rows = []
    for f in map(Path, metric_files):
        m = json.loads(f.read_text())
        row = {"model": m["model"], "slides": m["n_slides"], "labelled": m["n_labelled"], "refused": m["n_refused"]}
        for k in METRICS:
            v = m.get(k)
            lo, hi = m.get(f"{k}_ci95") or [None, None]
            row[k] = v
            row[f"{k}_ci95"] = (f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if None not in (v, lo, hi)
                                else (f"{v:.3f}" if v is not None else ""))
        rows.append(row)
    return pd.DataFrame(rows)


def prepare_slides(run: TrainedRun, rows: list[SlideRow], results: str | Path, batch_size: int = 64,
                   workers: int = 1, device: str = "auto") -> None:
    """Tile and extract, with the run's recorded parameters, every slide whose stores under
    `results` are missing or disagree with the run (what the workflow's rules do, without it).
    A slide that fails gets a failed store (one logged line) and the others go on."""
    from pipeline.config import TilingConfig
    from pipeline.devices import resolve_device
    from pipeline.errors import SlideError
    from pipeline.features.extract import Encoder, ExtractConfig, extract_features
    from pipeline.store import write_failed_store
    from pipeline.tiling.stage import record_failure, tile_to_store

    results = Path(results)
    tiling = TilingConfig.from_dict(run.tiling)
    cfg = ExtractConfig(batch_size=batch_size, num_workers=workers, device=device)
    encoders: dict[str, Encoder] = {}
    for r in rows:
        store = results / "tiles" / f"{r.slide_id}.zarr"
        status, attrs = store_state(store)
        if status != "ok" or tiling_mismatch(run, attrs.get("tiling") or {}):
            try:
                tile_to_store(r.path, store, tiling, mpp=r.mpp, slide_id=r.slide_id,
                              qc_png=results / "qc" / f"{r.slide_id}.png", mask_png=results / "qc" / f"{r.slide_id}.mask.png")
            except SlideError as e:
                record_failure(store, e, r.slide_id)
                log.error("%s", e)
                continue
        if store_state(store)[0] != "ok":
            continue
        tile_sha = read_attrs(store).get("tiles_sha256")
        for name in dict.fromkeys(run.encoders.values()):
            mags = [m for m, e in run.encoders.items() if e == name]
            out = results / "features" / encoder_dir(name) / f"{r.slide_id}.zarr"
            st, fa = store_state(out)
            if st == "ok" and fa.get("tiles_sha256") == tile_sha and not any(feature_mismatch(run, m, fa) for m in mags):
                continue
            try:
                if name not in encoders:
                    encoders[name] = Encoder(name, run.weights[name], resolve_device(device))
                extract_features(store, out, name, run.weights[name], slide=str(r.path), mags=mags,
                                 cfg=cfg, enc=encoders[name])
            except SlideError as e:
                write_failed_store(out, "features", r.slide_id, str(e), {"encoder": name})
                log.error("%s", e)
