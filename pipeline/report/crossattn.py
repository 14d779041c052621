"""Figure of what M2OTCA's cross-attention does on a cohort (read-outs of
:mod:`pipeline.mil.models.diagnostics`): per epoch on the validation slides (history.tsv) and per
test slide (predictions.csv), for every model of a run that has an OT plan or gradient weights.

A user reads it as: is the OT plan on aligned tissue (near 1) or spread over the bag (near
1 / m, the paper's cost)? Do the gradient weights single groups out (top-10 % share well above
0.1), and more on one class than on the other?
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_path

PLAN = "ot_aligned_"
WEIGHTS = "gw_top10"


def _runs(model_dirs: list[Path]) -> dict[str, tuple[list[pd.DataFrame], pd.DataFrame]]:
    """model name -> (history of each fold, test predictions of all folds) for models with read-outs."""
    out = {}
    for d in map(Path, model_dirs):
        hist, preds = [], []
        for fold in sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("fold_")):
            if (fold / "history.tsv").exists():
                hist.append(pd.read_csv(fold / "history.tsv", sep="\t").assign(fold=fold.name))
            if (fold / "predictions.csv").exists():
                preds.append(pd.read_csv(fold / "predictions.csv", dtype={"label": str}))
        have = [c for h in hist for c in h.columns if c.startswith((PLAN, WEIGHTS))]
        if have:
            out[d.name] = (hist, pd.concat(preds, ignore_index=True) if preds else pd.DataFrame())
    return out


def plot_cross_attention(model_dirs: list[str | Path], out: str | Path, n_groups: int | None = None) -> int:
    """Write the figure for the models under `model_dirs` (``<models>/<name>/fold_<k>/``);
    returns how many models have read-outs (0: a figure that says so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs([Path(p) for p in model_dirs])
    rows = max(1, len(runs))
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.3 * rows), dpi=110, squeeze=False)
    if not runs:
        for ax in axes[0]:
            ax.axis("off")
        axes[0, 1].text(0.5, 0.5, "no model with an OT plan or gradient weights in this run",
                        ha="center", va="center")
    colors = {"10x": "tab:blue", "5x": "tab:orange"}
    for ax_row, (name, (hist, preds)) in zip(axes, runs.items()):
        ax_plan, ax_w, ax_test = ax_row
        for h in hist:
            for c in [c for c in h.columns if c.startswith(PLAN)]:
                mag = c.removeprefix(PLAN)
                ax_plan.plot(h["epoch"], h[c], color=colors.get(mag, "tab:green"), alpha=0.7, lw=1.2,
                             label=mag if h is hist[0] else None)
            if WEIGHTS in h:
                ax_w.plot(h["epoch"], h[WEIGHTS], color="tab:purple", alpha=0.7, lw=1.2)
        if n_groups:
            ax_plan.axhline(1 / n_groups, ls="--", c="grey", lw=1)
            ax_plan.text(0, 1 / n_groups, " uniform plan (1/m)", va="bottom", fontsize=7, color="grey")
        ax_plan.set(title=f"{name}: OT plan mass on aligned tissue", xlabel="epoch", ylabel="validation mean",
                    ylim=(0, 1.05))
        if ax_plan.lines:
            ax_plan.legend(fontsize=7, frameon=False, loc="lower right")
        else:
            ax_plan.text(0.5, 0.5, "no OT plan", ha="center", va="center", transform=ax_plan.transAxes)
        ax_w.axhline(0.1, ls="--", c="grey", lw=1)
        ax_w.text(0, 0.1, " flat weights", va="bottom", fontsize=7, color="grey")
        ax_w.set(title="gradient weights: share on the top 10 % groups", xlabel="epoch", ylim=(0, 1.05))
        if not ax_w.lines:
            ax_w.text(0.5, 0.5, "no gradient weights", ha="center", va="center", transform=ax_w.transAxes)
        cols = [c for c in preds.columns if c.startswith(PLAN) or c == WEIGHTS]
        if cols and "label" in preds:
            labels = sorted(preds["label"].unique())
            data, names = [], []
            for c in cols:
                for lab in labels:
                    v = preds.loc[preds["label"] == lab, c].to_numpy(float)
                    data.append(v[np.isfinite(v)])
                    names.append(f"{c.replace(PLAN, 'aligned ').replace(WEIGHTS, 'top-10 %')}\n{lab}")
            ax_test.boxplot(data, showfliers=False)
            ax_test.set_xticks(range(1, len(names) + 1), names, fontsize=7)
        ax_test.set(title="test slides, by label", ylim=(0, 1.05))
        for ax in ax_row:
            ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return len(runs)
