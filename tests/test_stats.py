"""Model-comparison statistics (pipeline.mil.stats) and the cross-fold summary (pipeline.mil.metrics)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from pipeline.mil.metrics import METRICS, classification_metrics, fast_metrics, summarize
from pipeline.mil.stats import corrected_resampled_ttest, delong, delong_test, patient_bootstrap


def _delong_by_definition(y, scores):
    """DeLong's covariance from its definition: psi(x, y) = 1 if x > y, 1/2 if equal."""
    y = np.asarray(y, bool)
    aucs, v10, v01 = [], [], []
    for s in scores:
        psi = (s[y][:, None] > s[~y][None, :]) + 0.5 * (s[y][:, None] == s[~y][None, :])  # (m, n)
        aucs.append(psi.mean())
        v10.append(psi.mean(1))  # per positive
        v01.append(psi.mean(0))  # per negative
    m, n = y.sum(), (~y).sum()
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


def test_delong_matches_sklearn_auc_and_the_definition_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    a = np.round(rng.random(60) + y * 0.5, 1)  # rounded: many ties
    b = np.round(rng.random(60) + y * 0.2, 1)
    aucs, cov = delong(y, np.stack([a, b]))
    assert aucs[0] == pytest.approx(roc_auc_score(y, a)) and aucs[1] == pytest.approx(roc_auc_score(y, b))
    ref_aucs, ref_cov = _delong_by_definition(y, [a, b])
    np.testing.assert_allclose(aucs, ref_aucs)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)


def test_delong_test_separates_a_clear_difference_and_not_a_null_one():
    rng = np.random.default_rng(1)
    y = np.arange(400) % 2 == 0
    good, poor = rng.normal(size=400) + 1.5 * y, rng.normal(size=400) + 0.2 * y
    diff, p = delong_test(y, good, poor)
    assert diff > 0.2 and p < 1e-6
    diff, p = delong_test(y, good, good)
    assert diff == 0 and p == 1.0
    _, p = delong_test(y, good, good + rng.normal(scale=0.01, size=400))
    assert p > 0.05
    with pytest.raises(ValueError, match="2 slides of each class"):
        delong_test(np.array([1, 0, 0]), np.arange(3.0), np.arange(3.0))


def test_corrected_resampled_ttest():
    d = np.array([0.05, 0.02, 0.07, 0.03, 0.04])
    t, p = corrected_resampled_ttest(d, n_train=100, n_test=0)  # no correction: the paired t-test
    ref = stats.ttest_1samp(d, 0.0)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    t2, p2 = corrected_resampled_ttest(d, n_train=80, n_test=20)
    assert t2 == pytest.approx(d.mean() / np.sqrt((1 / 5 + 20 / 80) * d.var(ddof=1)))
    assert p2 > p  # the correction widens the interval
    assert np.isnan(corrected_resampled_ttest([0.1, 0.1, 0.1], 80, 20)[1])  # no variance: no test


def test_patient_bootstrap_moves_a_patients_slides_together():
    groups = np.repeat(np.arange(20), 2)  # two slides per patient
    seen = []

    def stat(rows):
        seen.append(rows)
        return np.array([len(rows), float(np.mean(groups[rows] % 2))])

    low, high = patient_bootstrap(groups, stat, n_resamples=200, seed=3)
    assert all(len(r) == 40 for r in seen)  # 20 patients drawn, 2 slides each
    assert all((np.bincount(groups[r], minlength=20) % 2 == 0).all() for r in seen)
    assert low[0] == high[0] == 40
    assert low[1] < 0.5 < high[1]
    again = patient_bootstrap(groups, stat, n_resamples=200, seed=3)
    np.testing.assert_array_equal(again[0], low)  # seeded
    nan_low, _ = patient_bootstrap(groups, lambda r: np.nan, n_resamples=50)
    assert np.isnan(nan_low).all()  # undefined on every resample: no interval


def test_binary_metrics_equal_classification_metrics():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(3, 40))
        y = rng.integers(0, 2, n)
        p1 = np.round(rng.random(n), 1)  # ties, and exact 0.5
        prob = np.stack([1 - p1, p1], 1)
        ref = classification_metrics(y, prob, ["a", "b"])
        got = fast_metrics(y, np.stack([1 - p1, p1], 1), 2)
        for k in METRICS:
            assert got[k] == pytest.approx(ref[k], nan_ok=True), k


def _write_fold(root, model, fold, slides, labels, p1):
    d = root / model / fold
    d.mkdir(parents=True)
    prob = np.stack([1 - p1, p1], 1)
    pd.DataFrame({"slide_id": slides, "label": [("normal", "tumor")[v] for v in labels],
                  "prob_normal": prob[:, 0], "prob_tumor": prob[:, 1]}).to_csv(d / "predictions.csv", index=False)
    m = classification_metrics(labels, prob, ["normal", "tumor"])
    (d / "metrics.json").write_text(json.dumps({"model": model, "n_test": len(slides), **m}))
    return d / "metrics.json"


def test_summary_cross_validation_uses_the_corrected_ttest_and_bootstrap_cis(tmp_path):
    rng = np.random.default_rng(4)
    slides = [f"s{i}" for i in range(50)]
    labels = np.arange(50) % 2
    splits = pd.DataFrame({"slide_id": slides, "patient_id": [f"p{i // 2}" for i in range(50)],
                           "label": labels})
    files, aucs = [], {}
    for f in range(5):
        test = np.arange(50) % 5 == f
        splits[f"fold_{f}"] = np.where(test, "test", "train")
        for model, signal in (("m2otca", 1.5), ("abmil_3", 0.5)):
            p1 = 1 / (1 + np.exp(-(rng.normal(size=test.sum()) + signal * (labels[test] - 0.5) * 2)))
            files.append(_write_fold(tmp_path, model, f"fold_{f}", np.array(slides)[test], labels[test], p1))
            aucs.setdefault(model, []).append(roc_auc_score(labels[test], p1))
    splits.to_csv(tmp_path / "splits.tsv", sep="\t", index=False)
    per_fold, table = summarize(files, "m2otca", tmp_path / "splits.tsv", n_resamples=300)
    t = table.set_index("model")
    assert len(per_fold) == 10
    d = np.array(aucs["m2otca"]) - np.array(aucs["abmil_3"])
    assert t.loc["abmil_3", "p_auc_vs_m2otca"] == pytest.approx(corrected_resampled_ttest(d, 40, 10)[1])
    assert t.loc["abmil_3", "test_vs_m2otca"].startswith("corrected resampled t-test")
    for model in ("m2otca", "abmil_3"):
        for k in METRICS:
            low, mean, high = t.loc[model, [f"{k}_ci_low", f"{k}_mean", f"{k}_ci_high"]]
            assert low <= mean <= high and high - low < 0.6, (model, k)
        assert f"[{t.loc[model, 'auc_ci_low']:.3f}, {t.loc[model, 'auc_ci_high']:.3f}]" in t.loc[model, "auc"]
    assert np.isnan(t.loc["m2otca", "p_auc_vs_m2otca"]) if "p_auc_vs_m2otca" in t else True


def test_auc_ci_on_small_folds(tmp_path):
    """Folds of 4-5 test slides (the demo's): many resamples draw one class in some fold; the
    AUC interval comes from the folds that have both, not from none at all."""
    slides = [f"s{i}" for i in range(24)]
    labels = np.arange(24) % 2
    splits = pd.DataFrame({"slide_id": slides, "patient_id": slides, "label": labels})
    files = []
    for f in range(5):
        test = np.arange(24) % 5 == f
        splits[f"fold_{f}"] = np.where(test, "test", "train")
        p1 = np.where(labels[test] == 1, 0.8, 0.3) + 0.01 * np.arange(test.sum())
        files.append(_write_fold(tmp_path, "m2otca", f"fold_{f}", np.array(slides)[test], labels[test], p1))
    splits.to_csv(tmp_path / "splits.tsv", sep="\t", index=False)
    t = summarize(files, "m2otca", tmp_path / "splits.tsv", n_resamples=200)[1].set_index("model")
    assert t.loc["m2otca", "auc_ci_low"] == 1.0 and t.loc["m2otca", "auc"] == "1.000 ± 0.000 [1.000, 1.000]"


def test_summary_fixed_test_set_uses_delong(tmp_path):
    rng = np.random.default_rng(5)
    slides = np.array([f"t{i}" for i in range(80)])
    labels = np.arange(80) % 2
    files, mean_p = [], {}
    for f in range(3):
        for model, signal in (("m2otca", 2.0), ("abmil_3", 0.7)):
            p1 = 1 / (1 + np.exp(-(rng.normal(size=80) + signal * (labels - 0.5) * 2)))
            files.append(_write_fold(tmp_path, model, f"fold_{f}", slides, labels, p1))
            mean_p[model] = mean_p.get(model, 0) + p1 / 3
    _, table = summarize(files, "m2otca", None, n_resamples=200)
    t = table.set_index("model")
    assert t.loc["abmil_3", "test_vs_m2otca"].startswith("DeLong")
    assert t.loc["abmil_3", "p_auc_vs_m2otca"] == pytest.approx(
        delong_test(labels, mean_p["m2otca"], mean_p["abmil_3"])[1])


def test_summary_without_predictions_has_no_test_or_interval(tmp_path):
    files = []
    for model, vals in {"m2otca": [0.9, 0.85, 0.8], "abmil_3": [0.7, 0.8, 0.72]}.items():
        for f, a in enumerate(vals):
            p = tmp_path / model / f"fold_{f}" / "metrics.json"
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps({"model": model, "auc": a, "acc": a, "balanced_acc": a, "f1": a}))
            files.append(p)
    _, table = summarize(files, "m2otca")
    t = table.set_index("model")
    assert t.loc["abmil_3", "auc"] == f"{np.mean([0.7, 0.8, 0.72]):.3f} ± {np.std([0.7, 0.8, 0.72], ddof=1):.3f}"
    assert np.isnan(t.loc["abmil_3", "p_auc_vs_m2otca"]) and t.loc["abmil_3", "test_vs_m2otca"].startswith("none")
