"""Metrics (scikit-learn), cross-fold summaries with bootstrap CIs and model comparisons
(:mod:`pipeline.mil.stats`), ROC figures (matplotlib)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
    roc_curve,
)

from pipeline.atomic import atomic_path
from pipeline.mil.stats import corrected_resampled_ttest, delong_test, patient_bootstrap

METRICS = ("auc", "acc", "balanced_acc", "f1")


def classification_metrics(y: np.ndarray, prob: np.ndarray, classes: list[str]) -> dict[str, float]:
    """AUC (one-vs-rest macro for > 2 classes), accuracy, balanced accuracy, F1 (macro for > 2)."""
    y = np.asarray(y)
    if len(y) == 0:
        return {k: float("nan") for k in METRICS}
    pred = prob.argmax(1)
    binary = len(classes) == 2
    try:
        if binary:
            auc = roc_auc_score(y, prob[:, 1])
        else:
            auc = roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=list(range(len(classes))))
    except ValueError:  # one class only in y
        auc = float("nan")
    return {
        "auc": float(auc),
        "acc": float(accuracy_score(y, pred)),
        "balanced_acc": float(balanced_accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, average="binary" if binary else "macro", zero_division=0)),
    }


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC AUC by the rank-sum (Mann-Whitney) identity, ties averaged: sklearn's value."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.nan
    return float((stats.rankdata(score)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fast_metrics(y: np.ndarray, prob: np.ndarray, n_classes: int) -> dict[str, float]:
    """:func:`classification_metrics` in plain numpy (same values, tested), ~100x faster: a
    bootstrap evaluates it thousands of times."""
    pred = prob.argmax(1)
    if n_classes == 2:
        auc = _auc(y == 1, prob[:, 1])
    else:
        present = np.bincount(y, minlength=n_classes) > 0
        auc = float(np.mean([_auc(y == c, prob[:, c]) for c in range(n_classes)])) if present.all() else np.nan
    labels = np.union1d(y, pred)
    tp = np.array([np.sum((y == c) & (pred == c)) for c in labels], dtype=float)
    true = np.array([np.sum(y == c) for c in labels], dtype=float)
    called = np.array([np.sum(pred == c) for c in labels], dtype=float)
    recall = tp[true > 0] / true[true > 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1s = np.where(true + called > 0, 2 * tp / (true + called), 0.0)
    if n_classes == 2:
        i = np.flatnonzero(labels == 1)
        f1 = float(f1s[i[0]]) if len(i) else 0.0
    else:
        f1 = float(f1s.mean())
    return {"auc": auc, "acc": float(np.mean(pred == y)), "balanced_acc": float(recall.mean()), "f1": f1}


def _load_predictions(metric_files: list[Path]) -> pd.DataFrame:
    """Every fold's predictions.csv (beside its metrics.json) with model and fold columns."""
    parts = []
    for f in metric_files:
        pred = f.parent / "predictions.csv"
        if pred.exists():
            m = json.loads(f.read_text())["model"]
            parts.append(pd.read_csv(pred, dtype={"slide_id": str, "label": str}).assign(model=m, fold=f.parent.name))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _fold_sizes(splits: pd.DataFrame | None, preds: pd.DataFrame) -> tuple[float, float]:
    """Mean (training + validation, test) slides per fold, for the corrected resampled t-test."""
    if splits is not None:
        folds = [c for c in splits.columns if c.startswith("fold_")]
        return (float(np.mean([splits[c].isin(["train", "val"]).sum() for c in folds])),
                float(np.mean([(splits[c] == "test").sum() for c in folds])))
    n_test = preds.groupby("fold").size().mean()
    return float(preds["slide_id"].nunique() - n_test), float(n_test)


class _ModelPredictions:
    """One model's pooled test predictions over folds, for patient-level bootstrap CIs."""

    def __init__(self, pred: pd.DataFrame, classes: list[str], patients: dict[str, str]):
        self.classes = classes
        self.prob = pred[[f"prob_{c}" for c in classes]].to_numpy(float)  # (R, C)
        self.y = pred["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()  # (R,)
        self.fold = pred["fold"].to_numpy()
        self.patient = pred["slide_id"].map(lambda s: patients.get(s, s)).to_numpy()
        self.folds = sorted(set(self.fold))

    def metrics(self, rows: np.ndarray) -> np.ndarray:
        """Mean over folds of (auc, acc, balanced_acc, f1) on `rows` (with repeats)."""
        out = []
        for f in self.folds:
            r = rows[self.fold[rows] == f]
            if not len(r):
                continue
            m = fast_metrics(self.y[r], self.prob[r], len(self.classes))
            out.append(tuple(m[k] for k in METRICS))
        if not out:
            return np.full(len(METRICS), np.nan)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():  # a metric no fold defines: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.asarray(out, float), axis=0)  # folds where a resample drew one class skip AUC

    def ci(self, n_resamples: int, seed: int = 0) -> dict[str, tuple[float, float]]:
        low, high = patient_bootstrap(self.patient, self.metrics, n_resamples=n_resamples, seed=seed)
        return {k: (float(low[i]), float(high[i])) for i, k in enumerate(METRICS)}


def _compare(ref: pd.DataFrame, other: pd.DataFrame, classes: list[str], ratio: tuple[float, float] | None,
             fixed: bool, ref_auc: pd.Series, auc: pd.Series) -> tuple[float, str]:
    """(p, test name) of the AUC of `other` against `ref`."""
    if fixed:
        if len(classes) != 2:
            return float("nan"), "none (DeLong's test is for two classes)"
        a = ref.groupby("slide_id")[f"prob_{classes[1]}"].mean()
        b = other.groupby("slide_id")[f"prob_{classes[1]}"].mean().reindex(a.index)
        y = (ref.groupby("slide_id")["label"].first().reindex(a.index) == classes[1]).to_numpy()
        try:
            _, p = delong_test(y, a.to_numpy(), b.to_numpy())
        except ValueError:
            p = float("nan")
        return p, "DeLong (fold-mean probabilities, one test set)"
    if ratio is None:
        return float("nan"), "none (no predictions or splits to size the folds)"
    both = pd.concat([ref_auc.rename("ref"), auc.rename("other")], axis=1, join="inner").dropna()
    _, p = corrected_resampled_ttest(both["ref"] - both["other"], *ratio)
    return p, f"corrected resampled t-test ({len(both)} folds)"


def summarize(metric_files: list[str | Path], reference: str = "m2otca", splits: str | Path | None = None,
              n_resamples: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold table, and per model: mean ± std over folds, a patient-level bootstrap 95 % CI of
    that mean (from the predictions.csv beside each metrics.json) and a test of the AUC against
    `reference`: DeLong's when every fold tests the same slides (a fixed test set), else the
    corrected resampled t-test over folds (:mod:`pipeline.mil.stats`)."""
    metric_files = [Path(f) for f in metric_files]
    rows = []
    for f in metric_files:
        m = json.loads(f.read_text())
        rows.append({"model": m["model"], "fold": f.parent.name, "n_test": m.get("n_test"),
                     **{k: float("nan") if m[k] is None else m[k] for k in METRICS}})  # null: undefined
    per_fold = pd.DataFrame(rows)
    preds = _load_predictions(metric_files)
    split_df = pd.read_csv(splits, sep="\t", dtype=str, keep_default_na=False) if splits else None
    patients = dict(zip(split_df["slide_id"], split_df["patient_id"])) if split_df is not None else {}
    classes = sorted(c.removeprefix("prob_") for c in preds.columns if c.startswith("prob_")) if len(preds) else []
    fixed = len(preds) > 0 and all(
        g.groupby("fold")["slide_id"].apply(frozenset).nunique() == 1 for _, g in preds.groupby("model"))
    ratio = _fold_sizes(split_df, preds) if len(preds) or split_df is not None else None
    ref_auc = per_fold[per_fold["model"] == reference].set_index("fold")["auc"]
    out = []
    for model, g in per_fold.groupby("model", sort=False):
        row = {"model": model, "folds": len(g)}
        mine = preds[preds["model"] == model] if len(preds) else preds
        ci = _ModelPredictions(mine, classes, patients).ci(n_resamples) if len(mine) and classes else {}
        for k in METRICS:
            row[f"{k}_mean"], row[f"{k}_std"] = g[k].mean(), g[k].std(ddof=1) if len(g) > 1 else 0.0
            row[f"{k}_ci_low"], row[f"{k}_ci_high"] = ci.get(k, (np.nan, np.nan))
            interval = "" if np.isnan(row[f"{k}_ci_low"]) else f" [{row[f'{k}_ci_low']:.3f}, {row[f'{k}_ci_high']:.3f}]"
            row[k] = f"{g[k].mean():.3f} ± {row[f'{k}_std']:.3f}{interval}"
        if model != reference and len(ref_auc):
            ref_preds = preds[preds["model"] == reference] if len(preds) else preds
            p, test = _compare(ref_preds, mine, classes, ratio, fixed and len(ref_preds) > 0 and len(mine) > 0,
                               ref_auc, g.set_index("fold")["auc"])
            row[f"p_auc_vs_{reference}"], row[f"test_vs_{reference}"] = p, test
        out.append(row)
    table = pd.DataFrame(out).sort_values("auc_mean", ascending=False)
    return per_fold, table


def plot_roc(prediction_files: list[str | Path], out: str | Path, title: str = "") -> None:
    """ROC curve per fold (binary: the second class is positive) with the mean AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    aucs = []
    for f in map(Path, prediction_files):
        df = pd.read_csv(f)
        prob_cols = [c for c in df.columns if c.startswith("prob_")]
        if len(prob_cols) != 2 or df["label"].nunique() < 2:
            continue
        pos = prob_cols[1].removeprefix("prob_")
        y = (df["label"].astype(str) == pos).to_numpy()
        fpr, tpr, _ = roc_curve(y, df[prob_cols[1]])
        auc = roc_auc_score(y, df[prob_cols[1]])
        aucs.append(auc)
        ax.plot(fpr, tpr, lw=1.5, alpha=0.8, label=f"{f.parent.name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{title}  mean AUC {np.mean(aucs):.3f}" if aucs else title)
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
