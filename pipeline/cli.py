"""Command line: `python -m pipeline <command>` (also the `m2otca-pipeline` console script).

Every command is a thin wrapper over a library function. Bad input (a `PipelineError`: slide,
sheet, config or option, annotation file, trained run; or an input file that does not exist)
exits 2 with ONE line on stderr naming the slide or file and the cause; anything else exits 1,
also with one line (a traceback only with --debug). `--record-failure` instead writes a failed
store for a slide error, so a workflow goes on with the other slides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError, RunError, SheetError, SlideError, one_line

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args) -> exit code` as a sub-command."""

    def deco(fn):
        COMMANDS[name] = (add_args, fn)
        return fn

    return deco


def _tile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", help="slide file (or DICOM folder)")
    p.add_argument("--out", required=True, help="tile store to write (<slide_id>.zarr)")
    p.add_argument("--mpp", type=float, default=None, help="override the scan resolution (µm/px)")
    p.add_argument("--config", default=None, help="config.yaml (its `tiling:` block is used)")
    p.add_argument("--tiling", default=None, help="tiling options as JSON (override --config)")
    p.add_argument("--slide-id", default=None, help="id recorded in the store (default: file stem)")
    p.add_argument("--qc", default=None, help="QC thumbnail PNG to write")
    p.add_argument("--mask", default=None, help="tissue mask PNG to write")
    p.add_argument("--annotations", default=None, help="QuPath GeoJSON or ASAP XML of the slide (with --include/--exclude)")
    p.add_argument("--include", default="", help="comma-separated classes: tile only inside them")
    p.add_argument("--exclude", default="", help="comma-separated classes: never tile inside them (e.g. pen marks)")
    p.add_argument("--record-failure", action="store_true",
                   help="on a slide error, write a failed store (and placeholder PNGs) and exit 0")


def _names(csv: str) -> list[str]:
    return [v for v in csv.split(",") if v]


@command("tile", _tile_args)
def _tile(args: argparse.Namespace) -> int:
    """Mask tissue and tile one slide at every magnification into a tile store."""
    from pipeline.config import TilingConfig, json_options, load_config
    from pipeline.tiling.stage import record_failure, tile_to_store

    block = json_options(args.tiling, "--tiling") if args.tiling is not None else load_config(args.config).get("tiling")
    cfg = TilingConfig.from_dict(block)
    try:
        tile_to_store(args.slide, args.out, cfg, mpp=args.mpp, slide_id=args.slide_id,
                      qc_png=args.qc, mask_png=args.mask, annotations=args.annotations,
                      include=_names(args.include), exclude=_names(args.exclude))
    except SlideError as e:
        if not args.record_failure:
            raise
        record_failure(args.out, e, args.slide_id, args.qc, args.mask)
        print(f"error: {e}", file=sys.stderr)
    return 0


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="tile store (<slide_id>.zarr) made by `tile`")
    p.add_argument("--slide", default=None, help="slide file (default: the path recorded in the tile store)")
    p.add_argument("--encoder", required=True, help="resnet18_simclr, uni or timm:<name>")
    p.add_argument("--weights", action="append", default=[], metavar="[MAG=]FILE",
                   help="local weights file, or MAG=FILE per magnification (repeat); none: random init, with a warning")
    p.add_argument("--out", required=True, help="feature store to write")
    p.add_argument("--mags", default=None, help="comma-separated magnifications (default: all in the store)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--on-tile-error", choices=["fail", "record"], default="fail",
                   help="a tile that fails to decode fails the slide, or is recorded and masked")
    p.add_argument("--record-failure", action="store_true",
                   help="on a slide error, write a failed feature store and exit 0")


def _weights_arg(values: list[str]) -> str | None | dict[str, str]:
    """`--weights FILE` (every magnification) or `--weights MAG=FILE` repeated (one model each)."""
    if not values:
        return None
    per_mag = {}
    for v in values:
        mag, sep, f = v.partition("=")
        if sep and mag and "/" not in mag and not Path(v).exists():
            per_mag[mag] = f
        elif len(values) == 1:
            return v
        else:
            raise ConfigError(f"--weights: give one FILE or MAG=FILE per magnification, got {values}")
    return per_mag


@command("extract", _extract_args)
def _extract(args: argparse.Namespace) -> int:
    """Encode every tile of a tile store into a feature store (resumable)."""
    from pipeline.features.extract import ExtractConfig, extract_features
    from pipeline.store import StoreBusy, write_failed_store

    cfg = ExtractConfig(batch_size=args.batch_size, num_workers=args.workers, device=args.device,
                        compile=args.compile, on_tile_error=args.on_tile_error)
    mags = args.mags.split(",") if args.mags else None
    try:
        extract_features(args.store, args.out, args.encoder, _weights_arg(args.weights), slide=args.slide, mags=mags,
                         cfg=cfg)
    except StoreBusy as e:
        print(f"error: {Path(args.store).name}: {e}; stopping", file=sys.stderr)
        return 75
    except SlideError as e:
        if not args.record_failure:
            raise
        write_failed_store(args.out, "features", e.slide, str(e), {"encoder": args.encoder})
        print(f"error: {e}", file=sys.stderr)
    return 0


def _features_arg(values: list[str]) -> dict[str, Path]:
    out = {}
    for v in values:
        mag, _, d = v.partition("=")
        if not d:
            raise ConfigError(f"--features expects MAG=DIR, got {v!r}")
        out[mag] = Path(d)
    return out


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


def _xattn_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="model folders (<models>/<feature set>/<model>) with fold_<k>/")
    p.add_argument("--out", required=True, help="PNG")
    p.add_argument("--n-groups", type=int, default=None, help="prototypes m (draws the uniform-plan line)")


@command("plot-cross-attention", _xattn_args)
def _plot_xattn(args: argparse.Namespace) -> int:
    """What M2OTCA's cross-attention does: OT plan alignment and gradient-weight concentration."""
    from pipeline.report.crossattn import plot_cross_attention

    n = plot_cross_attention(args.models, args.out, args.n_groups)
    logging.info("cross-attention read-outs of %d model(s) -> %s", n, args.out)
    return 0


def _heatmap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fold-dir", required=True, help="evaluation folder (attention.npz, predictions.csv)")
    p.add_argument("--tiles-dir", required=True, help="folder of the tile stores")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--slides", default="", help="comma-separated slide ids to draw (when in this fold)")
    p.add_argument("--n", type=int, default=2, help="also draw up to N more test slides, balanced by label")


@command("heatmaps", _heatmap_args)
def _heatmaps(args: argparse.Namespace) -> int:
    """Attention heatmaps (20x | 10x | 5x) of a model's test slides."""
    import pandas as pd

    from pipeline.report.heatmap import load_attention, render_heatmap
    from pipeline.store import read_tile_meta

    fold = Path(args.fold_dir)
    attn = load_attention(fold / "attention.npz")
    pred = pd.read_csv(fold / "predictions.csv").set_index("slide_id")
    wanted = [s for s in args.slides.split(",") if s in attn]
    queues = [[s for s in g.index if s in attn and s not in wanted] for _, g in pred.groupby("label")]
    extra: list[str] = []
    while len(extra) < args.n and any(queues):  # round-robin over labels
        for q in queues:
            if q and len(extra) < args.n:
                extra.append(q.pop(0))
    wanted += extra
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for sid in wanted:
        a = read_tile_meta(Path(args.tiles_dir) / f"{sid}.zarr")
        probs = ", ".join(f"P({c.removeprefix('prob_')})={pred.loc[sid, c]:.2f}" for c in pred.columns if c.startswith("prob_"))
        render_heatmap(a.slide_path, attn[sid], a.tile_px_level0, Path(args.out) / f"{sid}.png",
                       title=f"{sid}  label {pred.loc[sid, 'label']}  {probs}", mpp=a.base_mpp)
    logging.info("%d heatmaps -> %s", len(wanted), args.out)
    return 0


def _manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config-json", required=True, help="the resolved workflow config as JSON")
    p.add_argument("--sheet", required=True, help="slide sheet (TSV)")
    p.add_argument("--repo", default=".", help="the workflow's git checkout")
    p.add_argument("--weights-sha256", default="{}", help="JSON: encoder -> weights sha256")
    p.add_argument("--out", required=True, help="manifest.json to write")


@command("manifest", _manifest_args)
def _manifest(args: argparse.Namespace) -> int:
    """Write the run manifest (versions, hashes, commit, seeds)."""
    from pipeline.report.manifest import build_manifest, write_manifest

    m = build_manifest(json.loads(args.config_json), args.sheet, args.repo, json.loads(args.weights_sha256))
    write_manifest(args.out, m)
    logging.info("manifest: config %s, sheet %s, commit %s", m["config_sha256"][:12], m["sheet_sha256"][:12], m["git_commit"])
    return 0


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="tile or feature stores")
    p.add_argument("--out", required=True, help="per-slide table (TSV)")
    p.add_argument("--failed", default=None, help="failed-slides table (TSV)")


@command("summarize-tiles", _summary_args)
def _summarize(args: argparse.Namespace) -> int:
    """Tables of tiles per slide and of failed slides."""
    from pipeline.report.summary import write_summary

    df = write_summary(args.stores, args.out, args.failed)
    n_bad = int((df["status"] != "ok").sum())
    logging.info("%d slides, %d failed -> %s", len(df), n_bad, args.out)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for the slides and slides.tsv")
    p.add_argument("--n", type=int, default=24, help="number of slides")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--scale", type=float, default=1.0, help="slide size factor (0.3 for tests)")


@command("demo-cohort", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    """Write the synthetic demo cohort (pyramidal TIFFs + slides.tsv)."""
    from pipeline.synthetic.demo import make_demo_cohort

    sheet = make_demo_cohort(Path(args.out), n_slides=args.n, seed=args.seed, scale=args.scale)
    logging.info("demo cohort sheet: %s", sheet)
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="results folders (e.g. results/<cohort>) or tile/feature stores")


@command("verify", _verify_args)
def _verify(args: argparse.Namespace) -> int:
    """Check every store against its layout and inputs; exit 1 when anything is stale or broken."""
    from pipeline.verify import verify

    report = verify(args.paths)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    return 0 if report.ok else 1


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


def _qupath_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="tile store (<slide_id>.zarr)")
    p.add_argument("--mask", default=None, help="the tiling stage's mask PNG (tissue outlines)")
    p.add_argument("--attention", action="append", default=[], metavar="MODEL=NPZ",
                   help="attention.npz of an evaluation or prediction (repeat; a slide is read from the file holding it)")
    p.add_argument("--colour-model", default=None, help="model whose attention colours the tiles (default: the first)")
    p.add_argument("--out", required=True, help="GeoJSON FeatureCollection to write")


@command("export-qupath", _qupath_args)
def _export_qupath(args: argparse.Namespace) -> int:
    """A slide's tissue, tiles and attention as QuPath GeoJSON (level-0 px; File > Import objects)."""
    from pipeline.atomic import write_text
    from pipeline.report.geojson import export_slide, slide_attention
    from pipeline.store import store_state

    status, attrs = store_state(args.store)
    sid = attrs.get("slide_id", Path(args.store).stem)
    if status != "ok":  # a failed slide: an empty collection, so the cohort goes on
        write_text(args.out, '{"type":"FeatureCollection","features":[]}')
        print(f"error: {sid}: tile store {status}: {attrs.get('error', args.store)}; nothing to export", file=sys.stderr)
        return 0
    files: dict[str, list[str]] = {}
    for v in args.attention:
        model, _, npz = v.partition("=")
        files.setdefault(model, []).append(npz)
    attention = {m: a for m, f in files.items() if (a := slide_attention(f, sid))}
    n = export_slide(args.store, args.out, args.mask, attention, args.colour_model)
    logging.info("%s: %d objects (attention of %s) -> %s", sid, n, sorted(attention) or "no model", args.out)
    return 0


def _cohort_qc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sheet", required=True, help="slide sheet (TSV; labels and the optional site column colour the PCA)")
    p.add_argument("--features", action="append", required=True, metavar="MAG=DIR",
                   help="feature store folder per magnification (repeat)")
    p.add_argument("--out-dir", required=True, help="folder for cohort_outliers.tsv, cohort_features.tsv, cohort_qc.json, cohort_pca.svg")
    p.add_argument("--min-tiles", type=int, default=16, help="fewer usable tiles: listed as 'few tiles'")
    p.add_argument("--outlier-z", type=float, default=3.5, help="robust z-score of a slide's distance to the cohort mean")
    p.add_argument("--workers", type=int, default=1, help="Dask threads")


@command("cohort-qc", _cohort_qc_args)
def _cohort_qc(args: argparse.Namespace) -> int:
    """Cohort feature QC (Dask): slide means and spread, PCA, outlier slides, batch-effect score."""
    from pipeline.report.cohort_qc import QCConfig, cohort_qc
    from pipeline.slides.sheet import read_sheet

    rows = read_sheet(args.sheet, check_files=False, require_label=False)
    cfg = QCConfig(min_tiles=args.min_tiles, outlier_z=args.outlier_z, workers=args.workers)
    s = cohort_qc(rows, _features_arg(args.features), args.out_dir, cfg)
    logging.info("cohort QC: %d slides, %d listed (%d outliers) -> %s", s["slides"], s["listed"], s["outliers"], args.out_dir)
    return 0


def _pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="tile stores (<slide_id>.zarr) to sample tiles from")
    p.add_argument("--mag", required=True, help="magnification(s) to train on, comma-separated (several: one shared model)")
    p.add_argument("--out", required=True, help="weights file to write (resnet18_simclr, DSMIL layout); its .ckpt sits beside it")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256, help="tiles per step (two views each)")
    p.add_argument("--crop", type=int, default=224, help="view side in px (>= 64)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam peak learning rate (cosine schedule)")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    p.add_argument("--tiles-per-slide", type=int, default=200, help="sampled tiles per slide and magnification")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers reading tiles from the slides")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--summary", default=None, help="JSON summary to write (tiles, loss, images/s, sha256)")


@command("pretrain", _pretrain_args)
def _pretrain(args: argparse.Namespace) -> int:
    """SimCLR-pretrain resnet18_simclr on tiles of the given stores (resumable; atomic weights)."""
    from pipeline.atomic import write_json
    from pipeline.features.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(epochs=args.epochs, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                         temperature=args.temperature, tiles_per_slide=args.tiles_per_slide, seed=args.seed,
                         num_workers=args.workers, device=args.device)
    summary = pretrain(args.stores, _names(args.mag), args.out, cfg)
    if args.summary:
        write_json(args.summary, summary)
    return 0


def _lesion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sheet", required=True, help="slide sheet (TSV): labels, and the `annotations` column")
    p.add_argument("--annotations-dir", default=None,
                   help="folder of <slide_id>.geojson/.xml lesion annotations (instead of the sheet's column)")
    p.add_argument("--lesion-classes", required=True, help="comma-separated annotation classes that are lesion")
    p.add_argument("--non-lesion-classes", default="", help="comma-separated classes cut out of the lesion")
    p.add_argument("--normal-label", default="normal", help="sheet label of slides without lesions")
    p.add_argument("--features", action="append", default=[], metavar="MAG=DIR",
                   help="feature store folder per magnification for the tile linear probe (repeat)")
    p.add_argument("--attention", action="append", default=[], metavar="MODEL=NPZ",
                   help="attention.npz of an evaluation (repeat; e.g. one per fold)")
    p.add_argument("--max-tiles-per-slide", type=int, default=None, help="subsample tiles for the probe")
    p.add_argument("--out-dir", required=True,
                   help="folder for lesion_probe.tsv, lesion_attention.tsv (and .png), lesion_eval.json")


@command("evaluate-lesions", _lesion_args)
def _evaluate_lesions(args: argparse.Namespace) -> int:
    """Lesion evaluation: tile linear-probe AUC per feature set and attention AUC (lesion vs other tiles)."""
    from pipeline.atomic import write_json, write_tsv
    from pipeline.report.lesion_eval import (
        attention_auc,
        linear_probe,
        plot_lesion_auc,
        summarize_attention,
    )
    from pipeline.slides.annotations import lesion_geometries
    from pipeline.slides.sheet import read_sheet

    rows = read_sheet(args.sheet, check_files=False)
    if args.annotations_dir:
        d = Path(args.annotations_dir)
        files = {r.slide_id: next((f for f in (d / f"{r.slide_id}.geojson", d / f"{r.slide_id}.json",
                                                d / f"{r.slide_id}.xml") if f.is_file()), None) for r in rows}
    else:
        files = {r.slide_id: r.annotations for r in rows}
    lesions = lesion_geometries(files, _names(args.lesion_classes), _names(args.non_lesion_classes))
    if not lesions:
        raise SheetError(f"{args.annotations_dir or args.sheet}: no slide has a readable lesion annotation")
    out = Path(args.out_dir)
    result: dict = {"annotated_slides": len(lesions)}
    probe = None
    if args.features:
        probe = linear_probe(_features_arg(args.features), {r.slide_id: r.label for r in rows}, lesions,
                             args.normal_label, max_tiles_per_slide=args.max_tiles_per_slide)
        write_tsv(out / "lesion_probe.tsv", probe)
        result["linear_probe_auc"] = dict(zip(probe["mag"], probe["auc"]))
    if args.attention:
        per_model: dict[str, list[str]] = {}
        for a in args.attention:
            model, _, f = a.partition("=")
            if not f:
                raise SheetError(f"--attention expects MODEL=NPZ, got {a!r}")
            per_model.setdefault(model, []).append(f)
        table = attention_auc(per_model, lesions)
        summary = summarize_attention(table)
        write_tsv(out / "lesion_attention.tsv", table)
        result["attention_auc"] = {m: dict(zip(g["mag"], g["mean_auc"])) for m, g in summary.groupby("model")}
        plot_lesion_auc(table, probe, out / "lesion_attention.png")
    write_json(out / "lesion_eval.json", result)
    logging.info("lesion evaluation -> %s: %s", out, json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, fn) in COMMANDS.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None
        p = sub.add_parser(name, help=summary and summary.replace("%", "%%"))  # argparse formats help with %
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.captureWarnings(True)  # warnings go to the log (stdout); stderr is for the error line
    try:
        return int(args.func(args) or 0)
    except PipelineError as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # an input named on the command line (or in the sheet) is not there
        if args.debug:
            raise
        print(f"error: {e.filename or one_line(e)}: file not found", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one readable line
        if args.debug:
            raise
        where = getattr(args, "slide", None) or getattr(args, "store", None) or ""
        prefix = f"{Path(where).name}: " if where else ""
        print(f"error: {prefix}{type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
