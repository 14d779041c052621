"""Metrics (scikit-learn), cross-fold summaries with paired t-tests (scipy), ROC figures (matplotlib)."""

from __future__ import annotations

import json
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


def summarize(metric_files: list[str | Path], reference: str = "m2otca") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold table and a mean ± std table with paired t-tests of `reference` against each model."""
    rows = []
    for f in map(Path, metric_files):
        m = json.loads(f.read_text())
        rows.append({"model": m["model"], "fold": f.parent.name, **{k: float("nan") if m[k] is None else m[k] for k in METRICS}})  # null: undefined
    per_fold = pd.DataFrame(rows)
    out = []
    ref = per_fold[per_fold["model"] == reference].set_index("fold")
    for model, g in per_fold.groupby("model", sort=False):
        row = {"model": model, "folds": len(g)}
        for k in METRICS:
            row[f"{k}_mean"], row[f"{k}_std"] = g[k].mean(), g[k].std(ddof=1) if len(g) > 1 else 0.0
            row[k] = f"{g[k].mean():.3f} ± {row[f'{k}_std']:.3f}"
        if model != reference and len(ref):
            both = pd.merge(ref[["auc"]], g.set_index("fold")[["auc"]], left_index=True, right_index=True,
                            how="inner", suffixes=("_ref", ""))
            a, b = both["auc_ref"].to_numpy(float), both["auc"].to_numpy(float)
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.sum() >= 2 and np.any(a[ok] != b[ok]):
                row[f"p_auc_vs_{reference}"] = float(stats.ttest_rel(a[ok], b[ok]).pvalue)
            else:
                row[f"p_auc_vs_{reference}"] = float("nan")
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
