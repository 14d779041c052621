"""Synthetic multi-scale benchmark: M2OTCA vs its ablations and ABMIL baselines, 5-fold CV.

The cohort comes from :mod:`pipeline.synthbags`: a positive ("tumor") slide has a small cluster
of regions where a 20x-only feature direction AND a 5x-only direction are both present; a
normal slide has no evidence, the 20x direction alone, the 5x direction alone, or both in two
clusters far apart (decoys). So no single magnification separates the classes, and with the
``apart`` decoys two magnifications looked at independently cannot either: the evidence has to
co-locate. The script first prints the AUCs of observers that KNOW the evidence directions
(``pipeline.synthbags.oracle_scores``): co-located evidence ~1.0, the 20x direction alone
~0.8, the 5x direction alone ~0.75, both scales scored independently ~0.85 — the ceilings of
each strategy, to read the learned models' AUCs against.

Everything goes through the library: ``pipeline.splits.write_splits`` (patient-level stratified
5 folds, a validation part carved from each training part), ``pipeline.train.train_fold``
(Adam, early stopping on validation AUC) and ``evaluate_fold``, ``pipeline.metrics.summarize``
(mean ± std over folds, paired t-test of the AUC against m2otca).

Defaults: 150 slides, D = 64, 16-64 regions per slide, lesion clusters of 3-6 regions; models
m2otca, m2otca_a (M_A), m2otca_b (M_B), m2otca_c (M_C), abmil_20x, abmil_3 (``--models`` also
takes clam_sb_3, transmil_3, ...) with d = 128, attention dim 64, m = 16 groups, dropout 0.25;
training batch 4, lr 5e-4, weight decay 1e-4, at most 30 epochs, patience 8, at least 8
epochs; one torch thread; seed 0. The table is whatever comes out; it is printed, not judged.

Usage: ``python bench/synthetic_benchmark.py [--out DIR] [--slides N] [--epochs E] ...``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bags import cohort_cache  # noqa: E402
from pipeline.metrics import METRICS, summarize  # noqa: E402
from pipeline.sheet import read_sheet  # noqa: E402
from pipeline.splits import fold_names, write_splits  # noqa: E402
from pipeline.synthbags import SynthConfig, assign_slides, make_cohort, make_slide, oracle_scores  # noqa: E402
from pipeline.train import TrainConfig, evaluate_fold, train_fold  # noqa: E402

MODELS = ("m2otca", "m2otca_a", "m2otca_b", "m2otca_c", "abmil_20x", "abmil_3")
LABELS = {"m2otca": "M2OTCA", "m2otca_a": "M_A (no cross-att.)", "m2otca_b": "M_B (gradient only)",
          "m2otca_c": "M_C (OT only)", "abmil_20x": "ABMIL-20x", "abmil_3": "ABMIL_3",
          "clam_sb_3": "CLAM-SB_3", "transmil_3": "TransMIL_3"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/m2otca_synthetic_benchmark")
    ap.add_argument("--slides", type=int, default=150)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--regions", type=int, nargs=2, default=(16, 64))
    ap.add_argument("--lesion-regions", type=int, nargs=2, default=(3, 6))
    ap.add_argument("--fine-amp", type=float, default=5.0)
    ap.add_argument("--coarse-amp", type=float, default=6.0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--min-epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--attn-dim", type=int, default=64)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0 = torch's default); 1 is several times faster on a busy machine")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    models = args.models.split(",")

    scfg = SynthConfig(n_slides=args.slides, dim=args.dim, regions=tuple(args.regions),
                       lesion_regions=tuple(args.lesion_regions), fine_amp=args.fine_amp,
                       coarse_amp=args.coarse_amp, seed=args.seed)
    cohort = make_cohort(out / "cohort", scfg)
    rows = read_sheet(cohort.sheet, check_files=False)
    splits = write_splits(rows, out / "splits.tsv", k=args.folds, val_fraction=0.2, seed=args.seed)
    folds = fold_names(splits)
    cache, classes = cohort_cache(cohort.sheet, cohort.feature_dirs, args.groups)
    mags = list(cohort.feature_dirs)
    kinds = Counter(cohort.kinds.values())
    n20 = [len(cache[s].feats["20x"]) for s in cohort.slides]
    t_data = time.perf_counter() - t0
    print(f"cohort: {len(rows)} slides, {len({r.patient_id for r in rows})} patients, "
          f"labels {dict(Counter(r.label for r in rows))}, kinds {dict(kinds)}, "
          f"20x tiles {min(n20)}-{max(n20)} (mean {sum(n20) / len(n20):.0f}), D={args.dim}; "
          f"{len(folds)} folds; data {t_data:.1f}s", flush=True)

    # reference: AUCs of observers who know the evidence directions (not learned, no CV)
    labels, patients, _ = assign_slides(scfg)
    oracle: dict[str, list[float]] = {}
    for i, (k, pid) in enumerate(zip(labels, patients)):
        for key, v in oracle_scores(make_slide(i, scfg, k, pid), scfg).items():
            oracle.setdefault(key, []).append(v)
    y = [int(k > 0) for k in labels]
    print("oracle AUCs (directions known): " + ", ".join(f"{k} {roc_auc_score(y, v):.3f}" for k, v in oracle.items()),
          flush=True)

    tcfg = TrainConfig(epochs=args.epochs, patience=args.patience, min_epochs=args.min_epochs, lr=args.lr,
                       batch_size=args.batch_size, seed=args.seed,
                       model={"d": args.d, "attn_dim": args.attn_dim, "n_groups": args.groups})
    metric_files = []
    for name in models:
        t_model = time.perf_counter()
        aucs = []
        for fold in folds:
            part = dict(zip(splits["slide_id"], splits[fold]))
            ids = {k: cache.usable([s for s, v in part.items() if v == k]) for k in ("train", "val", "test")}
            fold_dir = out / "runs" / name / fold
            ckpt = train_fold(name, cache, ids["train"], ids["val"], classes, mags, tcfg, fold_dir,
                              {"fold": fold, "train_ids": ids["train"], "val_ids": ids["val"]})
            m = evaluate_fold(ckpt, cache, ids["test"], fold_dir)
            metric_files.append(fold_dir / "metrics.json")
            aucs.append(f"{m['auc']:.3f}@{ckpt['best_epoch']}")
        print(f"{name:10s} {time.perf_counter() - t_model:6.1f}s  test AUC@best epoch per fold: {' '.join(aucs)}",
              flush=True)

    per_fold, table = summarize(metric_files, reference="m2otca")
    per_fold.to_csv(out / "per_fold.tsv", sep="\t", index=False)
    table.to_csv(out / "summary.tsv", sep="\t", index=False)
    table = table.set_index("model").reindex([m for m in models if m in set(table["model"])]).reset_index()
    print(f"\nSynthetic multi-scale benchmark: {len(folds)}-fold patient-level CV, {len(rows)} slides, "
          f"seed {args.seed} (mean ± std over folds; p = paired t-test of the fold AUCs vs M2OTCA)")
    head = f"| {'model':22s} | " + " | ".join(f"{k:13s}" for k in METRICS) + " | p (AUC vs M2OTCA) |"
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    for _, r in table.iterrows():
        p = r.get("p_auc_vs_m2otca", float("nan"))
        p_txt = "—" if r["model"] == "m2otca" else ("n/a" if p != p else f"{p:.3g}")
        print(f"| {LABELS.get(r['model'], r['model']):22s} | " + " | ".join(f"{r[k]:13s}" for k in METRICS)
              + f" | {p_txt:17s} |")
    (out / "benchmark.json").write_text(json.dumps({"args": vars(args), "seconds": time.perf_counter() - t0},
                                                   indent=1, default=str))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; per-fold metrics in {out / 'per_fold.tsv'}")


if __name__ == "__main__":
    main()
