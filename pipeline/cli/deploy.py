"""Deployment commands (workflow/rules/predict.smk): `predict` new slides with a trained run,
`summarize-predictions`."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli import command
from pipeline.errors import RunError, SheetError


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="results folder of the trained run (results/<cohort>)")
    p.add_argument("--sheet", required=True, help="slide sheet of the new slides (the label column is optional)")
    p.add_argument("--results", required=True, help="results folder of the new slides (tiles/, features/<encoder>/)")
    p.add_argument("--out", default=None, help="one subfolder per model (default <results>/predictions/<feature set>)")
    p.add_argument("--feature-set", default=None, help="the run's models/<feature set> (default: its only one)")
    p.add_argument("--models", default="", help="comma-separated models (default: every complete one)")
    p.add_argument("--weights", action="append", default=[], metavar="ENCODER=FILE",
                   help="where the run's encoder weights are now, if moved (their sha256 is checked)")
    p.add_argument("--prepare", action="store_true",
                   help="first tile and extract (with the run's parameters) slides whose stores are missing or differ")
    p.add_argument("--bootstrap", type=int, default=2000, help="patient-level bootstrap resamples for 95%% CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, auto, cuda, ... (models; --prepare's extraction uses auto)")
    p.add_argument("--heatmap-slides", default="", help="comma-separated slides always drawn")
    p.add_argument("--heatmap-n", type=int, default=4, help="plus the N most confident, by predicted class in turn")
    p.add_argument("--summary", default=None, help="also write the per-model summary table (TSV) here")


@command("predict", _predict_args)
def _predict(args: argparse.Namespace) -> int:
    """Predict new slides with a trained run's fold models (ensemble), checked against its record."""
    from pipeline.atomic import write_tsv
    from pipeline.deploy.predict import (
        PredictConfig,
        predict_cohort,
        prepare_slides,
        summarize_predictions,
    )
    from pipeline.deploy.trained_run import load_trained_run
    from pipeline.slides.sheet import read_sheet

    weights = {k: v for k, _, v in (w.partition("=") for w in args.weights)}
    models = [m for m in args.models.split(",") if m]
    run = load_trained_run(args.run, args.feature_set, models or None, weights)
    rows = read_sheet(args.sheet, check_files=args.prepare, require_label=False, labels=run.classes)
    if args.prepare:
        prepare_slides(run, rows, args.results)
    cfg = PredictConfig(n_bootstrap=args.bootstrap, seed=args.seed, device=args.device,
                        heatmap_slides=tuple(s for s in args.heatmap_slides.split(",") if s), heatmap_n=args.heatmap_n)
    out = Path(args.out or Path(args.results) / "predictions" / run.feature_set)
    metrics = predict_cohort(run, rows, args.results, out, models or None, cfg)
    if args.summary:
        write_tsv(args.summary, summarize_predictions([out / m / "metrics.json" for m in metrics]))
    if not metrics:
        raise RunError(f"trained run {args.run}: none of the models {models} can be used")
    if not any(m["n_slides"] for m in metrics.values()):
        raise SheetError(f"{args.sheet}: no slide could be predicted (see {out}/*/refused.tsv)")
    return 0


def _predict_summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("metrics", nargs="+", help="metrics.json files written by `predict` (one per model)")
    p.add_argument("--out", required=True, help="summary table (TSV)")


@command("summarize-predictions", _predict_summary_args)
def _summarize_predictions(args: argparse.Namespace) -> int:
    """One row per model of a prediction run: slides, refused, metrics with 95% CIs."""
    from pipeline.atomic import write_tsv
    from pipeline.deploy.predict import summarize_predictions

    table = summarize_predictions(args.metrics)
    write_tsv(args.out, table)
    print(table[["model", "slides", "labelled", "refused"] + [c for c in table.columns if c.endswith("_ci95")]].to_string(index=False))
    return 0
