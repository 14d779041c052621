"""Prediction on new slides with a trained run (synthetic feature stores, tiny models): the
ensemble, the run's contract (refusals), incomplete runs, unlabelled sheets, bootstrap CIs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.deploy.predict import PredictConfig, bootstrap_ci, predict_cohort
from pipeline.deploy.trained_run import RunError, load_trained_run
from pipeline.errors import SheetError
from pipeline.mil.bags import cohort_cache
from pipeline.mil.metrics import classification_metrics, fast_metrics
from pipeline.mil.splits import write_splits
from pipeline.mil.train import TrainConfig, train_fold
from pipeline.slides.sheet import read_sheet
from pipeline.store import TileSet, TileStoreMeta, write_tile_store
from pipeline.synthetic.bags import (
    MAGS,
    SynthConfig,
    SynthSlide,
    make_cohort,
    make_slide,
    write_slide,
)

TINY = dict(dim=16, regions=(12, 24), lesion_regions=(2, 3))
MODEL = {"d": 16, "attn_dim": 8, "n_groups": 4, "dropout": 0.0}
TILING = {"magnifications": {"20x": 0.5, "10x": 1.0, "5x": 2.0}, "tile_size": 224, "tissue_threshold": 0.35,
          "mask_mpp": 8.0, "max_read_pixels": 4_000_000}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tile_stores(cohort, tiles_dir: Path, cfg: SynthConfig, tiling=TILING) -> None:
    """Tile stores matching the synthetic feature stores (same tiles, hence same tiles_sha256)."""
    for i, sid in enumerate(cohort.slides):
        s = make_slide(i, cfg, cfg.classes.index(cohort.labels[sid]), "p")
        write_tile_store(tiles_dir / f"{sid}.zarr", s.tiles, TileStoreMeta(slide_id=sid, tiling=tiling))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """results/<cohort> of a trained run: 2 folds of abmil_3 on 20 synthetic slides."""
    root = tmp_path_factory.mktemp("run") / "results" / "train"
    cfg = SynthConfig(n_slides=20, seed=3, **TINY)
    c = make_cohort(root.parent.parent / "cohort", cfg)
    (root / "features").mkdir(parents=True)
    shutil.copytree(c.feature_dir, root / "features" / "synthetic")
    _tile_stores(c, root / "tiles", cfg)
    splits = write_splits(read_sheet(c.sheet, check_files=False), root / "splits" / "splits.tsv", k=2, val_fraction=0.25)
    dirs = {m: root / "features" / "synthetic" for m in MAGS}
    cache, classes = cohort_cache(c.sheet, dirs, MODEL["n_groups"])
    tcfg = TrainConfig(epochs=3, min_epochs=1, lr=2e-3, batch_size=4, seed=1, model=MODEL, prefetch=0)
    for fold in ("fold_0", "fold_1"):
        part = dict(zip(splits["slide_id"], splits[fold]))
        tr = [s for s, v in part.items() if v == "train"]
        va = [s for s, v in part.items() if v == "val"]
        prov = {"fold": fold, "features": {m: str(d) for m, d in dirs.items()}, "encoders": {m: "synthetic" for m in MAGS},
                "train_ids": tr, "val_ids": va}
        train_fold("abmil_3", cache, tr, va, classes, list(MAGS), tcfg, root / "models" / "synthetic" / "abmil_3" / fold, prov)
    return root


@pytest.fixture(scope="module")
def new_cohort(tmp_path_factory):
    """results/<cohort> of 8 new slides (another seed), stores made as the run's were."""
    base = tmp_path_factory.mktemp("new")
    cfg = SynthConfig(n_slides=8, seed=9, **TINY)  # 4 + 4 slides
    c = make_cohort(base / "cohort", cfg)
    res = base / "results" / "ext"
    (res / "features").mkdir(parents=True)
    shutil.copytree(c.feature_dir, res / "features" / "synthetic")
    _tile_stores(c, res / "tiles", cfg)
    return c, res, cfg


def _cfg(**kw) -> PredictConfig:
    return PredictConfig(**{"n_bootstrap": 200, "heatmap_n": 0, **kw})


def test_ensemble_predictions_metrics_and_identical_rerun(run_dir, new_cohort, tmp_path):
    c, res, _ = new_cohort
    run = load_trained_run(run_dir)
    assert run.folds == ["fold_0", "fold_1"] and run.classes == ["normal", "tumor"] and list(run.models) == ["abmil_3"]
    assert run.tiling == TILING and run.encoders == {m: "synthetic" for m in MAGS} and run.weights == {"synthetic": None}
    rows = read_sheet(c.sheet, check_files=False, require_label=False, labels=run.classes)
    m = predict_cohort(run, rows, res, tmp_path / "a", cfg=_cfg())["abmil_3"]
    pred = pd.read_csv(tmp_path / "a" / "abmil_3" / "predictions.csv", keep_default_na=False)
    assert pred["slide_id"].tolist() == c.slides and m["n_slides"] == 8 and m["n_refused"] == 0
    probs = pred[["prob_normal", "prob_tumor"]].to_numpy()
    folds = np.stack([pred[[f"{f}_prob_normal", f"{f}_prob_tumor"]].to_numpy() for f in run.folds])
    assert np.allclose(probs, folds.mean(0)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert not np.allclose(folds[0], folds[1])  # two different models
    assert (pred["pred"] == np.where(probs[:, 1] > probs[:, 0], "tumor", "normal")).all()
    y = (pred["label"] == "tumor").to_numpy().astype(int)
    assert m["auc"] == pytest.approx(classification_metrics(y, probs, run.classes)["auc"])
    lo, hi = m["auc_ci95"]
    assert lo <= m["auc"] <= hi and set(m["per_fold"]) == {"fold_0", "fold_1"}
    z = np.load(tmp_path / "a" / "abmil_3" / "attention.npz")
    assert {k.split("|")[0] for k in z.files} == set(c.slides)
    saved = json.loads((tmp_path / "a" / "abmil_3" / "metrics.json").read_text())
    assert saved["trained_run"]["feature_set"] == "synthetic" and saved["bootstrap"]["unit"] == "patient"
    # a rerun gives the same bytes
    predict_cohort(run, rows, res, tmp_path / "b", cfg=_cfg())
    for f in ("predictions.csv", "metrics.json", "refused.tsv"):
        assert (tmp_path / "a" / "abmil_3" / f).read_bytes() == (tmp_path / "b" / "abmil_3" / f).read_bytes(), f


def test_mismatched_encoder_weights_and_tiling_are_refused(run_dir, new_cohort, tmp_path, capsys):
    c, res0, cfg = new_cohort
    res = tmp_path / "res"
    shutil.copytree(res0, res)
    fdir = res / "features" / "synthetic"
    run = load_trained_run(run_dir)
    # slide 0: features of another encoder; slide 1: same encoder, other weights; slide 2: other tiling
    s0 = make_slide(0, cfg, cfg.classes.index(c.labels[c.slides[0]]), "p")
    s0.slide_id = c.slides[0]
    shutil.rmtree(fdir / f"{c.slides[0]}.zarr")
    write_slide(s0, fdir / f"{c.slides[0]}.zarr")
    attrs_path = fdir / f"{c.slides[0]}.zarr" / "zarr.json"
    meta = json.loads(attrs_path.read_text())
    meta["attributes"]["encoder"] = "timm:resnet50"
    attrs_path.write_text(json.dumps(meta))
    p1 = fdir / f"{c.slides[1]}.zarr" / "zarr.json"
    meta = json.loads(p1.read_text())
    meta["attributes"]["weights_sha256"] = "ab" * 32
    p1.write_text(json.dumps(meta))
    s2 = make_slide(2, cfg, cfg.classes.index(c.labels[c.slides[2]]), "p")
    write_tile_store(res / "tiles" / f"{c.slides[2]}.zarr", s2.tiles,
                     TileStoreMeta(slide_id=c.slides[2], tiling={**TILING, "tissue_threshold": 0.5}))
    rows = read_sheet(c.sheet, check_files=False, require_label=False)
    m = predict_cohort(run, rows, res, tmp_path / "out", cfg=_cfg())["abmil_3"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"refused: {c.slides[0]}: 20x features encoder timm:resnet50, the trained run's synthetic",
        f"refused: {c.slides[1]}: 20x features weights_sha256 abababababab…, the trained run's none (random init)",
        f"refused: {c.slides[2]}: tiled with tissue_threshold=0.5, the trained run with tissue_threshold=0.35",
    ]
    assert m["n_slides"] == 5 and m["n_refused"] == 3
    refused = pd.read_csv(tmp_path / "out" / "abmil_3" / "refused.tsv", sep="\t")
    assert refused["slide_id"].tolist() == c.slides[:3] and set(refused["kind"]) == {"mismatch"}
    pred = pd.read_csv(tmp_path / "out" / "abmil_3" / "predictions.csv")
    assert pred["slide_id"].tolist() == c.slides[3:]


def test_stale_features_and_failed_slides_left_out(run_dir, new_cohort, tmp_path):
    c, res0, cfg = new_cohort
    res = tmp_path / "res"
    shutil.copytree(res0, res)
    # slide 0 re-tiled (other tiles, same parameters): its features are stale
    s = make_slide(5, cfg, 0, "p")
    write_tile_store(res / "tiles" / f"{c.slides[0]}.zarr", s.tiles, TileStoreMeta(slide_id=c.slides[0], tiling=TILING))
    shutil.rmtree(res / "features" / "synthetic" / f"{c.slides[1]}.zarr")
    from pipeline.store import write_failed_store

    write_failed_store(res / "tiles" / f"{c.slides[2]}.zarr", "tiles", c.slides[2], "unreadable slide")
    # slide 3: no tissue at all (empty stores): left out, not fatal
    z = np.zeros((0, 2), np.int64)
    empty = {t: TileSet(z, z.astype(np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64))
             for t in MAGS}
    write_tile_store(res / "tiles" / f"{c.slides[3]}.zarr", empty, TileStoreMeta(slide_id=c.slides[3], tiling=TILING))
    shutil.rmtree(res / "features" / "synthetic" / f"{c.slides[3]}.zarr")
    write_slide(SynthSlide(c.slides[3], "p", "normal", "none", empty, {t: np.zeros((0, 16), np.float16) for t in MAGS},
                           {t: np.zeros(0, bool) for t in MAGS}), res / "features" / "synthetic" / f"{c.slides[3]}.zarr")
    rows = read_sheet(c.sheet, check_files=False)
    predict_cohort(run := load_trained_run(run_dir), rows, res, tmp_path / "out", cfg=_cfg(n_bootstrap=0))
    refused = pd.read_csv(tmp_path / "out" / "abmil_3" / "refused.tsv", sep="\t").set_index("slide_id")
    assert refused.loc[c.slides[0], "kind"] == "mismatch" and "other tiles" in refused.loc[c.slides[0], "detail"]
    assert refused.loc[c.slides[1], "kind"] == "failed" and "missing" in refused.loc[c.slides[1], "detail"]
    assert refused.loc[c.slides[2], "detail"] == "tiling failed: unreadable slide"
    assert refused.loc[c.slides[3], "detail"] == "no tiles with tissue at any magnification"
    pred = pd.read_csv(tmp_path / "out" / "abmil_3" / "predictions.csv")
    assert pred["slide_id"].tolist() == c.slides[4:] and run.models


def test_unlabelled_sheet_predicts_without_metrics(run_dir, new_cohort, tmp_path):
    c, res, _ = new_cohort
    text = c.sheet.read_text().splitlines()
    cols = text[0].split("\t")
    keep = [i for i, h in enumerate(cols) if h != "label"]
    (tmp_path / "s.tsv").write_text("\n".join("\t".join(line.split("\t")[i] for i in keep) for line in text) + "\n")
    with pytest.raises(SheetError, match="missing column"):
        read_sheet(tmp_path / "s.tsv", check_files=False)
    rc = main(["predict", "--run", str(run_dir), "--sheet", str(tmp_path / "s.tsv"), "--results", str(res),
               "--out", str(tmp_path / "out"), "--heatmap-n", "0", "--summary", str(tmp_path / "summary.tsv")])
    assert rc == 0
    pred = pd.read_csv(tmp_path / "out" / "abmil_3" / "predictions.csv", keep_default_na=False)
    assert len(pred) == 8 and (pred["label"] == "").all()
    m = json.loads((tmp_path / "out" / "abmil_3" / "metrics.json").read_text())
    assert m["n_labelled"] == 0 and m["auc"] is None
    assert (tmp_path / "out" / "abmil_3" / "scores.png").stat().st_size > 0
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    assert summary["slides"].tolist() == [8] and summary["labelled"].tolist() == [0]


def test_incomplete_run_leaves_the_model_out(run_dir, tmp_path, caplog):
    run2 = tmp_path / "run"
    shutil.copytree(run_dir, run2)
    shutil.copytree(run2 / "models" / "synthetic" / "abmil_3", run2 / "models" / "synthetic" / "abmil_3b")
    missing = run2 / "models" / "synthetic" / "abmil_3" / "fold_1" / "checkpoint.pt"
    missing.unlink()
    with caplog.at_level(logging.ERROR, logger="pipeline.deploy.trained_run"):
        run = load_trained_run(run2)
    assert list(run.models) == ["abmil_3b"] and str(missing) in run.left_out["abmil_3"]
    assert [r.getMessage() for r in caplog.records] == [
        f"trained run {run2}: model abmil_3 left out: 1 of 2 folds missing, first {missing}"]
    shutil.rmtree(run2 / "models" / "synthetic" / "abmil_3b")
    with pytest.raises(RunError, match=f"no complete model.*abmil_3: 1 of 2 folds missing, first {missing}"):
        load_trained_run(run2)
    assert main(["predict", "--run", str(run2), "--sheet", "x.tsv", "--results", str(tmp_path)]) == 2


def test_weights_are_found_by_hash(run_dir, tmp_path):
    """A run whose features used a weights file: the manifest's path, or a moved copy with the same hash."""
    run2 = tmp_path / "run"
    shutil.copytree(run_dir, run2)
    w = tmp_path / "w.pth"
    w.write_bytes(b"weights")
    from pipeline.features.encoders import weights_sha256

    for p in (run2 / "features" / "synthetic").glob("*.zarr/zarr.json"):
        meta = json.loads(p.read_text())
        meta["attributes"]["weights_sha256"] = weights_sha256(w)
        p.write_text(json.dumps(meta))
    manifest = run2 / "metrics" / "synthetic" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"config": {"features": {"weights": {"synthetic": str(w)}}}}))
    assert load_trained_run(run2).weights == {"synthetic": str(w)}
    moved = tmp_path / "moved.pth"
    w.rename(moved)
    with pytest.raises(RunError, match="weights file of synthetic not found"):
        load_trained_run(run2)
    assert load_trained_run(run2, weights={"synthetic": str(moved)}).weights == {"synthetic": str(moved)}
    (tmp_path / "other.pth").write_bytes(b"other")
    with pytest.raises(RunError, match="have sha256 .* the run's synthetic features were made with"):
        load_trained_run(run2, weights={"synthetic": str(tmp_path / "other.pth")})


def test_bootstrap_resamples_patients():
    """Two identical slides per patient: a patient-level bootstrap gives exactly the CIs of one
    slide per patient (a slide-level one would not)."""
    rng = np.random.default_rng(0)
    n = 40
    y = rng.integers(0, 2, n)
    prob1 = np.clip(0.5 * y + rng.normal(0.25, 0.25, n), 0, 1)
    prob = np.stack([1 - prob1, prob1], 1)
    pid = np.arange(n)
    one = bootstrap_ci(y, prob, pid, ["a", "b"], 300, seed=5)
    two = bootstrap_ci(np.repeat(y, 2), np.repeat(prob, 2, 0), np.repeat(pid, 2), ["a", "b"], 300, seed=5)
    assert one == two
    slide_level = bootstrap_ci(np.repeat(y, 2), np.repeat(prob, 2, 0), np.arange(2 * n), ["a", "b"], 300, seed=5)
    assert slide_level["auc"] != one["auc"]
    auc = classification_metrics(y, prob, ["a", "b"])["auc"]
    assert one["auc"][0] < auc < one["auc"][1] and one["auc"][1] - one["auc"][0] < 0.5


@pytest.mark.filterwarnings("ignore")  # sklearn warns on the one-class draws it is compared on
def test_fast_metrics_are_sklearns():
    rng = np.random.default_rng(1)
    for n_classes in (2, 3):
        for n in (3, 7, 40):
            for _ in range(30):
                y = rng.integers(0, n_classes, n)
                prob = rng.dirichlet(np.ones(n_classes), 4)[rng.integers(0, 4, n)]  # rows repeat: ties
                want = classification_metrics(y, prob, [str(c) for c in range(n_classes)])
                got = fast_metrics(y, prob, n_classes)
                for k in want:
                    assert got[k] == pytest.approx(want[k], nan_ok=True, abs=1e-12), (k, y, prob)


def test_sheet_without_labels_only_for_prediction(tmp_path):
    (tmp_path / "s.tsv").write_text("slide_id\tpath\tlabel\tpatient_id\tsite\n"
                                    "a\ta.svs\t\tp1\tH1\nb\tb.svs\ttumor\tp2\t\n")
    with pytest.raises(SheetError, match=r"row 2 \(a\): empty label"):
        read_sheet(tmp_path / "s.tsv", check_files=False)
    rows = read_sheet(tmp_path / "s.tsv", check_files=False, require_label=False)
    assert [(r.label, r.site) for r in rows] == [(None, "H1"), ("tumor", None)]
    with pytest.raises(SheetError, match=r"row 3 \(b\): label 'tumor' is not one of"):
        read_sheet(tmp_path / "s.tsv", check_files=False, require_label=False, labels=["x", "y"])
