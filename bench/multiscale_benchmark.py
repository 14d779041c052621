"""Decisive multi-scale benchmark: does a model use WHERE the evidence sits across magnifications?

Synthetic slides (:mod:`pipeline.synthetic.bags`) whose label rule is known, turned into bags by
:func:`pipeline.mil.bags.make_bag` (the function that turns a feature store into a bag: E1 groups,
tile centres), trained and evaluated with :func:`pipeline.mil.train.train_fold` / ``predict``. A
tumour's evidence is a 20x feature direction on some tiles of a small cluster of regions and a
5x direction on the 5x tiles of a cluster; 10x carries none. Tasks:

- ``coloc``: a positive has both pieces of evidence on the SAME regions; a negative is one of
  "apart" (both, far apart; 50 %), "coarse" (5x alone; 25 %), "none" (15 %), "fine" (20x alone;
  10 %). 20x alone is informative (as on CAMELYON16, where 20x alone beats 5x alone), and an
  observer reading each magnification on its own cannot beat the per-scale ceiling;
- ``control``: a positive has both pieces of evidence, each placed on its own; a negative has
  none, 20x alone or 5x alone. Nothing needs co-location;
- ``shuffled``: ``coloc`` with the 5x tiles' features permuted inside each bag: per-scale
  evidence is kept, co-location destroyed, so a model that truly uses co-location falls back
  to the per-scale ceiling.

Design: for each seed s (data AND initialisation), a training cohort (data seed s; the smaller
training sizes are the first slides of the largest, 20 % of each carved out for early stopping)
and a disjoint held-out test cohort of --test-size slides from another data seed (10,000 + s);
the evidence directions are shared (one world). Every model is trained once per (task, size,
seed) and scored by test AUC. Reported: mean AUC with a 95 % CI over seeds (t distribution),
paired differences on the same test slides against ABMIL_3 and M_A with their 95 % CI, and
observer ceilings computed from the evidence directions (``oracle_scores``): 20x alone, 5x
alone, the per-scale ceiling (the best combination of the two per-scale maxima, a gradient-
boosted classifier fitted on the training cohort's scores) and the region-wise co-location
oracle. Cross-attention read-outs (:mod:`pipeline.mil.models.diagnostics`) are averaged over the
test slides.

Runs go to a pool of --jobs processes (one torch thread each; one process on a GPU). Full run
(default): 9 models x {300, 1000} training slides x 5 seeds on ``coloc``, M2OTCA, M_A and
ABMIL_3 x 1000 x 5 seeds on ``control`` and ``shuffled``; ``--quick``: 4 models on ``coloc``,
M2OTCA and ABMIL_3 on the others, 300 training slides, 3 seeds, 500 test slides.
Last line: ``coloc_auc_m2otca= coloc_auc_abmil3= delta= delta_ci_low= shuffled_auc_m2otca=
control_delta= ceiling=`` (at the largest training size).

Usage: ``python bench/multiscale_benchmark.py [--quick] [--out DIR] [--jobs N] [--device cuda]``
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.synthetic.bags import DECOYS, SynthConfig  # noqa: E402

TASKS = {
    "coloc": dict(decoys=DECOYS, decoy_weights=(0.15, 0.10, 0.25, 0.50)),  # none, fine, coarse, apart
    "control": dict(decoys=("none", "fine", "coarse"), decoy_weights=(1.0, 1.0, 1.0),
                    positive_kind="independent"),
    "shuffled": dict(decoys=DECOYS, decoy_weights=(0.15, 0.10, 0.25, 0.50), shuffle_coarse=True),
}
MODELS = ("m2otca", "m2otca_paper", "m2otca_a", "m2otca_b", "m2otca_c", "abmil_20x", "abmil_3",
          "clam_sb_3", "transmil_3")
SIDE_MODELS = ("m2otca", "m2otca_a", "abmil_3")  # control and shuffled tasks
QUICK_MODELS = ("m2otca", "m2otca_paper", "m2otca_a", "abmil_3")
QUICK_SIDE_MODELS = ("m2otca", "abmil_3")
LABELS = {"m2otca": "M2OTCA (default)", "m2otca_paper": "M2OTCA (paper-literal)",
          "m2otca_a": "M_A (no cross-att.)", "m2otca_b": "M_B (gradient only)", "m2otca_c": "M_C (OT only)",
          "abmil_20x": "ABMIL-20x", "abmil_3": "ABMIL_3", "clam_sb_3": "CLAM-SB_3", "transmil_3": "TransMIL_3"}
WORLD_SEED = 2026  # evidence directions and tissue context, shared by every cohort
TEST_SEED = 10_000  # test cohort of seed s: data seed TEST_SEED + s
MAGS = ["20x", "10x", "5x"]
CEILINGS = ("20x only", "5x only", "per-scale ceiling", "co-location oracle")


@dataclass(frozen=True)
class Setup:
    """Everything a run needs besides (task, size, seed, model); picklable for the pool."""

    dim: int = 64
    regions: tuple[int, int] = (8, 24)
    lesion_regions: tuple[int, int] = (2, 4)
    n_groups: int = 16
    d: int = 64
    attn_dim: int = 32
    epochs: int = 30
    patience: int = 8
    lr: float = 1e-3
    batch_size: int = 8
    test_size: int = 1000
    device: str = "auto"

    def cohort(self, task: str, seed: int, n: int) -> SynthConfig:
        return SynthConfig(n_slides=n, dim=self.dim, regions=self.regions, lesion_regions=self.lesion_regions,
                           seed=seed, world_seed=WORLD_SEED, second_slide=0.0, **TASKS[task])


@functools.lru_cache(maxsize=2)
def _data(setup: Setup, task: str, seed: int, n_train: int):
    """(cache over train + test bags, train ids, test ids, oracle scores of train and test)."""
    from pipeline.mil.bags import BagCache
    from pipeline.synthetic.bags import synth_bags

    train, o_train = synth_bags(setup.cohort(task, seed, n_train), setup.n_groups)
    test, o_test = synth_bags(setup.cohort(task, TEST_SEED + seed, setup.test_size), setup.n_groups)
    return BagCache.from_bags(train + test), [b.slide_id for b in train], [b.slide_id for b in test], o_train, o_test


def ceilings(o_train: list[dict], y_train: np.ndarray, o_test: list[dict], y_test: np.ndarray) -> dict[str, float]:
    """Observer AUCs on the test cohort (see the module docstring)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    def col(o, k):
        return np.array([s[k] for s in o])

    per_scale = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(
        np.stack([col(o_train, "20x only"), col(o_train, "5x only")], 1), y_train)
    p = per_scale.predict_proba(np.stack([col(o_test, "20x only"), col(o_test, "5x only")], 1))[:, 1]
    return {"20x only": roc_auc_score(y_test, col(o_test, "20x only")),
            "5x only": roc_auc_score(y_test, col(o_test, "5x only")),
            "per-scale ceiling": roc_auc_score(y_test, p),
            "co-location oracle": roc_auc_score(y_test, col(o_test, "co-located"))}


def run_one(setup: Setup, task: str, n_train: int, seed: int, model: str, n_max: int, out: str) -> dict:
    """Train `model` on the first `n_train` slides of the (task, seed) cohort; test AUC and read-outs."""
    import torch
    from sklearn.metrics import roc_auc_score

    from pipeline.mil.train import TrainConfig, load_model, predict, train_fold

    torch.set_num_threads(1)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    cache, train_ids, test_ids, o_train, o_test = _data(setup, task, seed, n_max)
    ids = train_ids[:n_train]
    rng = np.random.default_rng([seed, n_train])
    val = set(rng.choice(ids, size=len(ids) // 5, replace=False).tolist())
    fit = [s for s in ids if s not in val]
    tcfg = TrainConfig(epochs=setup.epochs, patience=setup.patience, min_epochs=setup.patience, lr=setup.lr,
                       batch_size=setup.batch_size, seed=seed, prefetch=0, device=setup.device,
                       model={"d": setup.d, "attn_dim": setup.attn_dim, "n_groups": setup.n_groups})
    run_dir = Path(out) / "runs" / task / str(n_train) / str(seed) / model
    ckpt = train_fold(model, cache, fit, sorted(val), ["normal", "tumor"], MAGS, tcfg, run_dir, {})
    res = predict(load_model(ckpt, setup.device), cache, test_ids, MAGS, 32, prefetch=0)
    y = np.array([cache.labels[s] for s in test_ids])
    row = {"task": task, "n_train": n_train, "seed": seed, "model": model,
           "auc": float(roc_auc_score(y, res["prob"][:, 1])), "best_epoch": ckpt["best_epoch"],
           "seconds": time.perf_counter() - t0}
    row.update({k: float(np.nanmean(v)) for k, v in res["diagnostics"].items() if np.isfinite(v).any()})
    return row


def mean_ci(x: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % CI over seeds (t distribution); a single value has no interval."""
    x = np.asarray(x, float)
    m = float(x.mean())
    if len(x) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return m, m - h, m + h


def paired(runs: pd.DataFrame, task: str, n: int, model: str, ref: str) -> tuple[float, float, float]:
    """Mean and 95 % CI of AUC(model) - AUC(ref), paired by seed (same test slides)."""
    sub = runs[(runs.task == task) & (runs.n_train == n)].pivot(index="seed", columns="model", values="auc")
    if model not in sub or ref not in sub:
        return (float("nan"),) * 3
    return mean_ci((sub[model] - sub[ref]).dropna().to_numpy())


def table(runs: pd.DataFrame, ceil: pd.DataFrame, task: str, n: int) -> str:
    sub = runs[(runs.task == task) & (runs.n_train == n)]
    lines = [f"\n### {task}, {n} training slides, {sub.seed.nunique()} seeds, {int(ceil.n_test.iloc[0])} test slides",
             "", "| model | test AUC (95 % CI) | vs ABMIL_3 | vs M_A | aligned plan mass | gw top-10 % share |",
             "|---|---|---|---|---|---|"]
    order = [m for m in MODELS if m in set(sub.model)]
    for m in sorted(order, key=lambda m: -sub[sub.model == m].auc.mean()):
        a = mean_ci(sub[sub.model == m].auc)
        cells = [f"{a[0]:.3f} ({max(a[1], 0.0):.3f}–{min(a[2], 1.0):.3f})"]  # an AUC lies in [0, 1]
        for ref in ("abmil_3", "m2otca_a"):
            d = paired(runs, task, n, m, ref)
            cells.append("—" if m == ref or d[0] != d[0] else f"{d[0]:+.3f} ({d[1]:+.3f}, {d[2]:+.3f})")
        g = sub[sub.model == m]
        aligned = g.filter(like="ot_aligned_5x").mean().iloc[0] if "ot_aligned_5x" in g else float("nan")
        top = g["gw_top10"].mean() if "gw_top10" in g else float("nan")
        cells += ["" if aligned != aligned else f"{aligned:.2f}", "" if top != top else f"{top:.2f}"]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines.append("| observers (directions known): " + ", ".join(
        f"{k} {ceil[k].mean():.3f}" for k in CEILINGS) + " | | | | |")
    return "\n".join(lines)


def plan(args) -> list[tuple[str, int, int, str]]:
    sizes = sorted(args.train_sizes)
    jobs = []
    for task in args.tasks:
        for n in (sizes if task == "coloc" else sizes[-1:]):
            side = QUICK_SIDE_MODELS if args.quick else SIDE_MODELS
            models = args.models if task == "coloc" else [m for m in args.models if m in side]
            for seed in range(args.seeds):
                jobs += [(task, n, seed, m) for m in models]
    return jobs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/m2otca_multiscale_benchmark")
    ap.add_argument("--quick", action="store_true", help="fewer models, 300 training slides, 3 seeds, 500 test slides")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--models", default=None, help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument("--train-sizes", default=None, help="comma-separated training cohort sizes (default 300,1000)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds (data and initialisation; default 5)")
    ap.add_argument("--test-size", type=int, default=None, help="held-out test slides (default 1000)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="runs in parallel, one torch thread each (default: the CPU cores, 1 with a GPU)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    ap.add_argument("--epochs", type=int, default=Setup.epochs, help="maximum epochs per run")
    ap.add_argument("--patience", type=int, default=Setup.patience, help="early-stopping patience (and min epochs)")
    args = ap.parse_args(argv)
    args.tasks = args.tasks.split(",")
    args.models = (args.models or ",".join(QUICK_MODELS if args.quick else MODELS)).split(",")
    args.train_sizes = [int(v) for v in (args.train_sizes or ("300" if args.quick else "300,1000")).split(",")]
    args.seeds = args.seeds or (3 if args.quick else 5)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.jobs = args.jobs or (1 if args.device.startswith("cuda") else os.cpu_count() or 1)
    setup = Setup(test_size=args.test_size or (500 if args.quick else 1000), device=args.device,
                  epochs=args.epochs, patience=args.patience)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    jobs = plan(args)
    n_max = max(args.train_sizes)
    print(f"{len(jobs)} runs on {args.jobs} process(es): tasks {args.tasks}, sizes {args.train_sizes}, "
          f"{args.seeds} seeds, {setup.test_size} test slides", flush=True)
    rows = []

    def done(r: dict) -> None:
        rows.append(r)
        print(f"[{len(rows)}/{len(jobs)} {time.perf_counter() - t0:5.0f}s] {r['task']:8s} n={r['n_train']:<5d} "
              f"seed {r['seed']} {r['model']:13s} AUC {r['auc']:.3f} (epoch {r['best_epoch']}, "
              f"{r['seconds']:.0f}s)", flush=True)

    if args.jobs <= 1:  # in this process (a GPU, or tests)
        for job in jobs:
            done(run_one(setup, *job, n_max, str(out)))
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for f in as_completed([pool.submit(run_one, setup, *job, n_max, str(out)) for job in jobs]):
                done(f.result())
    runs = pd.DataFrame(rows).sort_values(["task", "n_train", "seed", "model"])
    runs.to_csv(out / "runs.tsv", sep="\t", index=False)

    ceil_rows = []
    for task in args.tasks:
        for seed in range(args.seeds):
            _, train_ids, test_ids, o_train, o_test = _data(setup, task, seed, n_max)
            cache = _data(setup, task, seed, n_max)[0]
            y_tr = np.array([cache.labels[s] for s in train_ids])
            y_te = np.array([cache.labels[s] for s in test_ids])
            ceil_rows.append({"task": task, "seed": seed, "n_test": len(test_ids),
                              **ceilings(o_train, y_tr, o_test, y_te)})
    ceil = pd.DataFrame(ceil_rows)
    ceil.to_csv(out / "ceilings.tsv", sep="\t", index=False)

    report = [f"# Multi-scale benchmark ({time.perf_counter() - t0:.0f} s, {args.jobs} jobs)"]
    for task in args.tasks:
        for n in sorted(set(runs[runs.task == task].n_train)):
            report.append(table(runs, ceil[ceil.task == task], task, n))
    text = "\n".join(report)
    (out / "summary.md").write_text(text + "\n")
    print(text)

    n = max(args.train_sizes)
    co = runs[(runs.task == "coloc") & (runs.n_train == n)]
    d = paired(runs, "coloc", n, "m2otca", "abmil_3")
    sh = runs[(runs.task == "shuffled") & (runs.model == "m2otca")]
    ctl = paired(runs, "control", n, "m2otca", "abmil_3")
    summary = {"coloc_auc_m2otca": co[co.model == "m2otca"].auc.mean(),
               "coloc_auc_abmil3": co[co.model == "abmil_3"].auc.mean(),
               "delta": d[0], "delta_ci_low": d[1], "shuffled_auc_m2otca": sh.auc.mean(),
               "control_delta": ctl[0], "ceiling": ceil[ceil.task == "coloc"]["per-scale ceiling"].mean()}
    (out / "benchmark.json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1, default=str))
    print(" ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
