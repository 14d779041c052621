"""MIL commands (workflow/rules/training.smk): `splits`, `train`, `evaluate`,
`summarize-metrics`, `plot-roc`."""

from __future__ import annotations

import argparse
import logging

from pipeline.cli import command
from pipeline.cli.args import _features_arg
from pipeline.errors import ConfigError, SheetError, one_line


def _cohort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sheet", required=True, help="slide sheet (TSV)")
    p.add_argument("--splits", required=True, help="splits table made by `splits`")
    p.add_argument("--fold", required=True, help="fold column, e.g. fold_0")
    p.add_argument("--features", action="append", required=True, metavar="MAG=DIR",
                   help="feature store folder per magnification (repeat), e.g. 20x=results/c/features/uni")
    p.add_argument("--out", required=True, help="output folder of this model and fold")


def _splits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sheet", required=True, help="slide sheet (TSV)")
    p.add_argument("--out", required=True, help="splits table to write (TSV)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)


@command("splits", _splits_args)
def _splits(args: argparse.Namespace) -> int:
    """Patient-level stratified folds (or the sheet's split column), written once."""
    from pipeline.mil.splits import write_splits
    from pipeline.slides.sheet import read_sheet

    df = write_splits(read_sheet(args.sheet, check_files=False), args.out, args.folds, args.val_fraction, args.seed)
    logging.info("%d slides, %d folds -> %s", len(df), sum(c.startswith("fold_") for c in df.columns), args.out)
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    _cohort_args(p)
    p.add_argument("--model", required=True, help="model name (pipeline.mil.models.MODEL_NAMES)")
    p.add_argument("--config", default=None, help="config.yaml (its `training:` block)")
    p.add_argument("--training", default=None, help="training options as JSON (override --config)")


@command("train", _train_args)
def _train(args: argparse.Namespace) -> int:
    """Train one model on one fold, early-stopped on validation AUC."""
    from pipeline.config import json_options, load_config
    from pipeline.mil.bags import cohort_cache, feature_fingerprints
    from pipeline.mil.models import MODEL_NAMES, ModelConfig
    from pipeline.mil.splits import read_splits
    from pipeline.mil.train import TrainConfig, train_fold
    from pipeline.store import read_feature_meta

    if args.model not in MODEL_NAMES:
        raise ConfigError(f"--model {args.model!r}: unknown model; choose one of {', '.join(MODEL_NAMES)}")
    block = json_options(args.training, "--training") if args.training is not None else load_config(args.config).get("training")
    cfg = TrainConfig.from_dict(block)
    feature_dirs = _features_arg(args.features)
    cache, classes = cohort_cache(args.sheet, feature_dirs, ModelConfig.from_dict(cfg.model).n_groups)
    splits = read_splits(args.splits)
    part = dict(zip(splits["slide_id"], splits[args.fold]))
    train_ids = cache.usable([s for s, v in part.items() if v == "train"])
    val_ids = cache.usable([s for s, v in part.items() if v == "val"])
    if not train_ids:
        raise SheetError(f"{args.fold}: no usable training slides")
    provenance = {
        "fold": args.fold,
        "features": {m: str(d) for m, d in feature_dirs.items()},
        "encoders": {m: read_feature_meta(cache.stores[train_ids[0]][m]).encoder for m in feature_dirs},
        "store_fingerprints": {s: feature_fingerprints(cache.stores[s]) for s in train_ids + val_ids},
        "train_ids": train_ids,
        "val_ids": val_ids,
    }
    ckpt = train_fold(args.model, cache, train_ids, val_ids, classes, list(feature_dirs), cfg, args.out, provenance)
    logging.info("%s %s: best epoch %d -> %s", args.model, args.fold, ckpt["best_epoch"], args.out)
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    _cohort_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt made by `train`")


@command("evaluate", _evaluate_args)
def _evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on its fold's test slides: predictions.csv, metrics.json."""
    import torch

    from pipeline.mil.bags import cohort_cache
    from pipeline.mil.splits import read_splits
    from pipeline.mil.train import evaluate_fold

    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        ckpt["model_config"], ckpt["classes"]  # noqa: B018 - a checkpoint of `train`?
    except Exception as e:
        raise ConfigError(f"checkpoint {args.checkpoint}: not a checkpoint written by `train` "
                          f"({type(e).__name__}: {one_line(e)[:160]})") from e
    cache, classes = cohort_cache(args.sheet, _features_arg(args.features), ckpt["model_config"]["n_groups"])
    if classes != ckpt["classes"]:
        raise SheetError(f"classes in the sheet {classes} differ from the checkpoint's {ckpt['classes']}")
    splits = read_splits(args.splits)
    test_ids = cache.usable([s for s, v in zip(splits["slide_id"], splits[args.fold]) if v == "test"])
    m = evaluate_fold(ckpt, cache, test_ids, args.out)
    logging.info("%s %s: AUC %.4f, acc %.4f on %d test slides", ckpt["model_name"], args.fold, m["auc"], m["acc"], len(test_ids))
    return 0


def _metrics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("metrics", nargs="+", help="metrics.json files (<model>/<fold>/metrics.json)")
    p.add_argument("--out", required=True, help="summary table (TSV): mean ± std, 95 %% CIs, tests")
    p.add_argument("--per-fold", default=None, help="per-fold table (TSV)")
    p.add_argument("--reference", default="m2otca", help="model the tests compare against")
    p.add_argument("--splits", default=None, help="splits table: patients for the bootstrap, fold sizes")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the 95 %% CIs")


@command("summarize-metrics", _metrics_args)
def _summarize_metrics(args: argparse.Namespace) -> int:
    """Mean ± std over folds per model, bootstrap 95 % CIs, and tests against the reference."""
    from pipeline.atomic import write_tsv
    from pipeline.mil.metrics import summarize

    per_fold, table = summarize(args.metrics, args.reference, args.splits, args.resamples)
    write_tsv(args.out, table)
    if args.per_fold:
        write_tsv(args.per_fold, per_fold)
    cols = ["model", "auc", "acc", "balanced_acc", "f1"] + [c for c in table.columns if c.startswith(("p_", "test_"))]
    print(table[cols].to_string(index=False))
    return 0


def _roc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("predictions", nargs="+", help="predictions.csv files of one model (one per fold)")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--title", default="")


@command("plot-roc", _roc_args)
def _plot_roc(args: argparse.Namespace) -> int:
    """ROC curves of one model, one curve per fold."""
    from pipeline.mil.metrics import plot_roc

    plot_roc(args.predictions, args.out, args.title)
    return 0
