"""Report commands: figures, tables and exports read from a run's results
(workflow/rules/report.smk, qc.smk, qupath.smk; `plot-cross-attention` of training.smk)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.cli import command
from pipeline.cli.args import _features_arg, _names
from pipeline.errors import SheetError


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
    from pipeline.slides.sheet import find_annotation, read_sheet

    rows = read_sheet(args.sheet, check_files=False)
    if args.annotations_dir:
        files = {r.slide_id: find_annotation(args.annotations_dir, r.slide_id) for r in rows}
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
