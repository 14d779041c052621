"""Lesion evaluation: tile truth from annotations, slide-grouped linear probe, attention AUC, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from shapely.geometry import box

from pipeline.cli import main
from pipeline.report.lesion_eval import (
    attention_auc,
    lesion_tiles,
    linear_probe,
    plot_lesion_auc,
    summarize_attention,
)
from pipeline.store import FeatureStoreMeta, FeatureStoreWriter, TileSet

SIDE = 256
LESION = box(0, 0, 4 * SIDE, 4 * SIDE)  # the top-left 4 x 4 tiles of a 10 x 10 grid


def _tiles(n: int, side: int) -> TileSet:
    rc = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    return TileSet(coords=(rc[:, ::-1] * side).astype(np.int64), grid=rc.astype(np.int32),
                   tissue=np.ones(len(rc), np.float32), region=np.zeros(len(rc), np.int32),
                   parent=np.full(len(rc), -1, np.int64))


def _cohort(tmp_path, signal: float):
    """8 slides (4 tumour with LESION, 4 normal); feature 0 is raised by `signal` on lesion tiles."""
    rng = np.random.default_rng(0)
    labels, lesions = {}, {}
    d = tmp_path / f"feats_{signal}"
    tiles = {"20x": _tiles(10, SIDE), "10x": _tiles(5, 2 * SIDE)}
    for i in range(8):
        sid = f"s{i}"
        labels[sid] = "tumor" if i % 2 else "normal"
        if labels[sid] == "tumor":
            lesions[sid] = LESION
        w = FeatureStoreWriter(d / f"{sid}.zarr", tiles, {"20x": 8, "10x": 8}, FeatureStoreMeta(slide_id=sid))
        for m, t in tiles.items():
            f = rng.standard_normal((len(t), 8)).astype(np.float32)
            side = SIDE if m == "20x" else 2 * SIDE
            f[:, 0] += signal * lesion_tiles(t.coords, side, lesions.get(sid))
            w.write(m, 0, f.astype(np.float16), np.zeros(len(t), bool))
        w.finalize()
        w.close()
    return d, labels, lesions


def test_lesion_tiles_by_centre():
    coords = np.array([[0, 0], [3 * SIDE, 3 * SIDE], [4 * SIDE, 0], [3 * SIDE + 200, 0]])
    assert lesion_tiles(coords, SIDE, LESION).tolist() == [True, True, False, False]
    assert not lesion_tiles(coords, SIDE, None).any()


def test_linear_probe_separates_only_informative_features(tmp_path):
    good, labels, lesions = _cohort(tmp_path, signal=3.0)
    noise, _, _ = _cohort(tmp_path, signal=0.0)
    hi = linear_probe({"20x": good, "10x": good}, labels, lesions, folds=4)
    lo = linear_probe({"20x": noise}, labels, lesions, folds=4)
    assert hi["tiles"].tolist() == [800, 200] and hi["lesion_tiles"].tolist() == [64, 16]
    assert (hi["auc"] > 0.95).all() and lo["auc"].iloc[0] < 0.75


def test_attention_auc_per_slide_and_magnification(tmp_path):
    t = _tiles(10, SIDE)
    y = lesion_tiles(t.coords, SIDE, LESION)
    np.savez(tmp_path / "a.npz", **{"s1|20x|attention": y + 0.1, "s1|20x|coords": t.coords,
                                     "s0|20x|attention": np.ones(100), "s0|20x|coords": t.coords})
    np.savez(tmp_path / "b.npz", **{"s3|20x|attention": -y.astype(float), "s3|20x|coords": t.coords})
    table = attention_auc({"m": [tmp_path / "a.npz", tmp_path / "b.npz"]}, {"s1": LESION, "s3": LESION})
    assert table["slide"].tolist() == ["s1", "s3"] and table["auc"].tolist() == [1.0, 0.0]  # s0: no lesion
    s = summarize_attention(table)
    assert s.loc[0, "slides"] == 2 and s.loc[0, "mean_auc"] == pytest.approx(0.5)


def test_lesion_auc_figure(tmp_path):
    """One box per (model, magnification) with slides; the probe as a dotted line; an empty table says so."""
    import matplotlib.image

    table = pd.DataFrame({"model": ["m2otca"] * 4 + ["abmil_3"] * 2, "slide": ["a", "b", "a", "b", "a", "b"],
                          "mag": ["20x", "20x", "5x", "5x", "20x", "20x"], "auc": [0.9, 0.8, 0.7, np.nan, 0.6, 0.5]})
    probe = pd.DataFrame({"mag": ["20x", "5x"], "auc": [0.95, 0.85]})
    assert plot_lesion_auc(table, probe, tmp_path / "f.png") == 3  # abmil_3 has no 5x AUC
    img = matplotlib.image.imread(tmp_path / "f.png")
    assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05  # drawn, not blank
    assert plot_lesion_auc(table.iloc[:0], None, tmp_path / "empty.png") == 0
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reads_geojson_annotations(tmp_path):
    d, labels, lesions = _cohort(tmp_path, signal=3.0)
    ann = tmp_path / "ann"
    ann.mkdir()
    for sid in lesions:
        (ann / f"{sid}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{
            "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [list(LESION.exterior.coords)]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    sheet = tmp_path / "slides.tsv"
    pd.DataFrame({"slide_id": list(labels), "path": [str(tmp_path / f"{s}.tif") for s in labels],
                  "label": list(labels.values()), "patient_id": list(labels)}).to_csv(sheet, sep="\t", index=False)
    assert main(["evaluate-lesions", "--sheet", str(sheet), "--annotations-dir", str(ann), "--lesion-classes",
                 "Tumor", "--features", f"20x={d}", "--out-dir", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "lesion_eval.json").read_text())
    assert result["annotated_slides"] == 4 and result["linear_probe_auc"]["20x"] > 0.95
    t = _tiles(10, SIDE)  # an attention map that finds s1's lesion exactly: AUC 1, and its figure
    np.savez(tmp_path / "att.npz", **{"s1|20x|attention": lesion_tiles(t.coords, SIDE, LESION) + 0.1,
                                       "s1|20x|coords": t.coords})
    assert main(["evaluate-lesions", "--sheet", str(sheet), "--annotations-dir", str(ann), "--lesion-classes",
                 "Tumor", "--attention", f"m={tmp_path / 'att.npz'}", "--out-dir", str(tmp_path / "o3")]) == 0
    assert json.loads((tmp_path / "o3" / "lesion_eval.json").read_text())["attention_auc"] == {"m": {"20x": 1.0}}
    assert (tmp_path / "o3" / "lesion_attention.png").stat().st_size > 1000
    assert main(["evaluate-lesions", "--sheet", str(sheet), "--annotations-dir", str(tmp_path),
                 "--lesion-classes", "Tumor", "--out-dir", str(tmp_path / "o2")]) == 2  # no annotations: one line
