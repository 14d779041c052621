"""Statistics for comparing models on a cohort: tests that respect how the folds were made.

- k-fold cross-validation: the folds' training parts overlap, so a paired t-test over folds is
  anti-conservative; the corrected resampled t-test (Nadeau & Bengio, Machine Learning 2003)
  inflates the variance by n_test / n_train.
- a fixed test set (every fold tests the same slides, e.g. CAMELYON16's official split): DeLong's
  test (DeLong et al., Biometrics 1988; the fast form of Sun & Xu, IEEE SPL 2014) for the
  difference of two correlated AUCs on the same slides.
- confidence intervals: a patient-level percentile bootstrap (slides of one patient resampled
  together) of the mean-over-folds metric. scipy.stats.bootstrap resamples observations, not
  clusters with a metric that may be undefined on a resample (one class only), so the loop is
  written here; resamples where the metric is undefined are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats


def corrected_resampled_ttest(diffs: Sequence[float], n_train: float, n_test: float) -> tuple[float, float]:
    """(t, two-sided p) of k paired per-fold differences; variance * (1 / k + n_test / n_train)."""
    d = np.asarray(diffs, float)
    k = len(d)
    if k < 2 or np.ptp(d) == 0:  # one fold, or identical differences: no variance to test with
        return float("nan"), float("nan")
    var = d.var(ddof=1)
    t = d.mean() / np.sqrt((1.0 / k + n_test / n_train) * var)
    return float(t), float(2 * stats.t.sf(abs(t), k - 1))


def delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (K,) and their covariance (K, K) for K score vectors (K, N) on binary labels y (N,)."""
    y = np.asarray(y).astype(bool)
    s = np.atleast_2d(np.asarray(scores, float))  # (K, N)
    pos, neg = s[:, y], s[:, ~y]  # (K, m), (K, n)
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs >= 2 slides of each class, got {m} positive and {n} negative")
    tx = stats.rankdata(pos, axis=1)  # (K, m) mid-ranks among positives
    ty = stats.rankdata(neg, axis=1)  # (K, n)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # (K, m + n)
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n  # (K,)
    v01 = (tz[:, :m] - tx) / n  # (K, m) structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # (K, n) of the negatives
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n  # (K, K)
    return aucs, cov


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> tuple[float, float]:
    """(AUC_a - AUC_b, two-sided p) of DeLong's test on the same slides."""
    aucs, cov = delong(y, np.stack([score_a, score_b]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    if not var > 0:
        return diff, (1.0 if diff == 0 else 0.0)
    return diff, float(2 * stats.norm.sf(abs(diff) / np.sqrt(var)))


def patient_bootstrap(
    groups: np.ndarray,
    statistic: Callable[[np.ndarray], float | np.ndarray],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CIs of ``statistic(slide indices)`` (a number or a vector of K numbers) over
    resamples of the patients (``groups``: one entry per slide, its patient).

    Returns (low, high), arrays of shape (K,) (K = 1 for a number). A component that is undefined
    (NaN) on more than half of the resamples has no interval (NaN); otherwise its undefined
    resamples are dropped.
    """
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    values = np.stack([
        np.atleast_1d(np.asarray(statistic(np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])),
                                 float))
        for _ in range(n_resamples)
    ])  # (n_resamples, K)
    alpha = (1 - confidence) / 2
    low, high = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    for k in range(values.shape[1]):
        ok = values[np.isfinite(values[:, k]), k]
        if len(ok) >= n_resamples / 2:
            low[k], high[k] = np.quantile(ok, [alpha, 1 - alpha])
    return low, high
