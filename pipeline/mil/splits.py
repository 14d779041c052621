"""Patient-level stratified cross-validation splits, made once from the seed and saved.

Without a `split` column: k folds, each with a test part, and a validation part carved from the
rest. With one: the sheet's `test` rows are the test set of every fold and k validation parts
are carved from its `train` rows. Splits are made from the sheet, not from tiling outcomes, so
a slide that fails (and is later fixed) never reshuffles the folds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from pipeline.atomic import write_tsv
from pipeline.errors import SheetError
from pipeline.slides.sheet import SlideRow


def _carve(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    """Patient-grouped, label-stratified k-fold (index arrays), degrading gracefully on tiny cohorts."""
    n_groups = len(np.unique(groups))
    min_class = int(np.unique(labels, return_counts=True)[1].min())
    k = max(2, min(n_splits, n_groups, min_class))
    if min_class < 2 or n_groups < 2:  # too small to stratify: patient-grouped only
        return list(GroupKFold(n_splits=max(2, min(n_splits, n_groups))).split(labels, labels, groups)) if n_groups >= 2 else [(np.arange(len(labels)), np.arange(0))]
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(labels)), labels, groups))


def check_splittable(rows: list[SlideRow], k: int) -> None:
    """Refuse, before any work, a sheet that cannot give `k` patient-level folds with every class
    in every test part: one class only, fewer patients of a class than folds, or (with a `split`
    column) no test slide, one class left to train on, or a patient on both sides."""
    if k < 2:
        raise SheetError(f"splits: folds must be at least 2, got {k}")
    labels = sorted({r.label for r in rows})
    if len(labels) < 2:
        raise SheetError(f"slide sheet: only one class ({labels[0]!r}) in {len(rows)} slide(s); "
                         "classification needs at least two")
    if any(r.split for r in rows):
        test = [r for r in rows if r.split == "test"]
        pool = [r for r in rows if r.split != "test"]
        if not test:
            raise SheetError("slide sheet: the split column marks no slide 'test'; mark the test slides, "
                             "or drop the column for cross-validation")
        if len({r.label for r in pool}) < 2:
            raise SheetError(f"slide sheet: the slides not marked 'test' hold {len({r.label for r in pool})} class(es); "
                             "training needs at least two")
        both = sorted({r.patient_id for r in test} & {r.patient_id for r in pool})
        if both:
            raise SheetError(f"slide sheet: patient(s) {both[:3]} have slides both in the test split and outside it; "
                             "a patient's slides must all be on one side")
        return
    patients = {lab: {r.patient_id for r in rows if r.label == lab} for lab in labels}
    n_all = len({r.patient_id for r in rows})
    if n_all < k:
        raise SheetError(f"slide sheet: {n_all} patient(s), fewer than the {k} folds (splits.folds / --folds); "
                         f"lower the folds to at most {n_all} or add patients")
    few = {lab: len(p) for lab, p in patients.items() if len(p) < k}
    if few:
        lab, n = min(few.items(), key=lambda kv: kv[1])
        raise SheetError(f"slide sheet: class {lab!r} has {n} patient(s), fewer than the {k} folds "
                         f"(splits.folds / --folds), so some test folds would have none of it; lower the folds "
                         f"to at most {min(len(p) for p in patients.values())} or add patients")


def make_splits(rows: list[SlideRow], k: int = 5, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """Columns slide_id, patient_id, label, fold_0..fold_{k-1} with values train / val / test."""
    check_splittable(rows, k)
    df = pd.DataFrame([{"slide_id": r.slide_id, "patient_id": r.patient_id, "label": r.label,
                        "split": r.split or ""} for r in rows])
    n_val = max(2, int(round(1 / val_fraction))) if val_fraction > 0 else 0
    fixed = (df["split"] != "").any()
    for f in range(k):
        df[f"fold_{f}"] = "train"
    if fixed:
        test = df["split"] == "test"
        pool = np.flatnonzero(~test.to_numpy())
        df.loc[test, [f"fold_{f}" for f in range(k)]] = "test"
        if n_val:
            for f in range(k):  # a different validation part per fold, same test set
                parts = _carve(df["label"].to_numpy()[pool], df["patient_id"].to_numpy()[pool], n_val, seed + f)
                df.loc[df.index[pool[parts[0][1]]], f"fold_{f}"] = "val"
    else:
        folds = _carve(df["label"].to_numpy(), df["patient_id"].to_numpy(), k, seed)
        for f, (train_idx, test_idx) in enumerate(folds):
            df.loc[df.index[test_idx], f"fold_{f}"] = "test"
            if n_val:
                parts = _carve(df["label"].to_numpy()[train_idx], df["patient_id"].to_numpy()[train_idx], n_val, seed + 1 + f)
                df.loc[df.index[train_idx[parts[0][1]]], f"fold_{f}"] = "val"
        if len(folds) != k:  # check_splittable rules this out; never write fewer fold columns silently
            raise SheetError(f"splits: the sheet gives {len(folds)} folds, not the {k} asked for")
    return df.drop(columns="split")


def write_splits(rows: list[SlideRow], out: str | Path, k: int = 5, val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    df = make_splits(rows, k, val_fraction, seed)
    write_tsv(out, df)
    return df


def read_splits(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def fold_names(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("fold_")]
