"""Training and evaluation on tiny synthetic cohorts (pipeline.synthetic.bags): splits, padding,
reproducibility, early stopping, outputs, summaries, failed stores, multi-class AUC."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.mil.bag_arrays import assign_groups, tile_sides
from pipeline.mil.bags import cohort_cache, collate
from pipeline.mil.metrics import METRICS, classification_metrics
from pipeline.mil.models import ModelConfig, create_model
from pipeline.mil.splits import fold_names, make_splits, read_splits, write_splits
from pipeline.mil.train import TrainConfig, evaluate_fold, iter_batches, predict, train_fold
from pipeline.slides.sheet import SlideRow, read_sheet
from pipeline.store import read_feature_store
from pipeline.synthetic.bags import MAGS, TILE_PX, SynthConfig, make_cohort, make_slide, synth_bags

TINY = dict(dim=16, regions=(12, 24), lesion_regions=(2, 3))
MODEL = {"d": 16, "attn_dim": 8, "n_groups": 4, "dropout": 0.25}


def tiny_cfg(**kw) -> SynthConfig:
    return SynthConfig(**{"n_slides": 24, "seed": 3, **TINY, **kw})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is faster, and far steadier on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 slides (2 with failed feature stores), 2 classes."""
    return make_cohort(tmp_path_factory.mktemp("cohort"), tiny_cfg(), failed_slides=2)


@pytest.fixture(scope="module")
def loaded(cohort):
    cache, classes = cohort_cache(cohort.sheet, cohort.feature_dirs, MODEL["n_groups"])
    ids = cache.usable(cohort.slides)
    return cache, classes, ids


def _parts(ids: list[str], labels: dict[str, str]) -> tuple[list[str], list[str]]:
    """A deterministic train / val division with both classes in each part."""
    by = {}
    for s in ids:
        by.setdefault(labels[s], []).append(s)
    val = [s for v in by.values() for s in v[:3]]
    return [s for s in ids if s not in val], val


def _train(cache, classes, train_ids, val_ids, out: Path, model="m2otca", **kw):
    cfg = TrainConfig(**{"epochs": 4, "patience": 10, "min_epochs": 1, "lr": 2e-3, "batch_size": 3, "seed": 7,
                         "model": MODEL, **kw})
    return train_fold(model, cache, train_ids, val_ids, classes, list(MAGS), cfg, out, {"fold": "fold_0"})


# --------------------------------------------------------------------------- synthetic cohort


def test_synthetic_slide_geometry_and_determinism():
    cfg = tiny_cfg()
    a, b = make_slide(5, cfg, 1, "p"), make_slide(5, cfg, 1, "p")
    for t in MAGS:
        assert np.array_equal(a.feats[t], b.feats[t]) and np.array_equal(a.tiles[t].coords, b.tiles[t].coords)
        ts = a.tiles[t]
        assert a.feats[t].dtype == np.float16 and a.feats[t].shape == (len(ts), cfg.dim)
        assert np.all(np.diff(ts.region) >= 0)  # stored in region (raster) order
        assert np.array_equal(ts.coords, ts.grid[:, ::-1].astype(np.int64) * TILE_PX[t])  # x = col, y = row
    assert not np.array_equal(a.feats["20x"], make_slide(5, SynthConfig(**{**TINY, "seed": 4}), 1, "p").feats["20x"])
    regions_5x = a.tiles["5x"].region
    assert len(np.unique(regions_5x)) == len(regions_5x)  # one 5x tile per region
    for fine, coarse in (("20x", "10x"), ("10x", "5x")):
        f, c = a.tiles[fine], a.tiles[coarse]
        has = f.parent >= 0  # -1: the parent tile was dropped (10x tiles may be, 5x never)
        assert has.all() if coarse == "5x" else has.mean() > 0.8
        assert np.array_equal(c.grid[f.parent[has]], f.grid[has] // 2)
        assert np.array_equal(c.region[f.parent[has]], f.region[has])
        kept = {tuple(g) for g in c.grid.tolist()}
        assert not any(tuple(g) in kept for g in (f.grid[~has] // 2).tolist())
    assert a.kind == "lesion" and a.lesion  # label 1: both pieces of evidence, co-located
    assert len(a.tiles["20x"]) <= 16 * len(regions_5x) and len(a.tiles["10x"]) <= 4 * len(regions_5x)


def test_cohort_stores_and_sheet(cohort, loaded):
    cache, classes, ids = loaded
    rows = read_sheet(cohort.sheet, check_files=False)
    assert [r.slide_id for r in rows] == cohort.slides and classes == ["normal", "tumor"]
    assert len(ids) == len(cohort.slides) - 2
    meta, sets = read_feature_store(cohort.feature_dir / f"{ids[0]}.zarr")
    assert meta.encoder == "synthetic" and set(sets) == set(MAGS)
    bag = cache[ids[0]]
    assert np.array_equal(bag.feats["20x"].numpy(), sets["20x"].features)
    # the bag's groups are assign_groups of its region ids (the finest magnification as reference)
    regions = {t: sets[t].region for t in MAGS}
    ref = assign_groups(regions["20x"], regions, MODEL["n_groups"])
    assert all(np.array_equal(bag.group[t].numpy(), ref[t]) for t in MAGS)
    # reused when complete, same bytes as a fresh generation
    again = make_cohort(cohort.sheet.parent, tiny_cfg(), failed_slides=2)
    assert again.kinds == cohort.kinds


def test_tile_sides_from_the_grid_and_centres_in_bags():
    rng = np.random.default_rng(1)
    f = 447.6  # level-0 px of a 20x tile, fractional as on real scans (rounded on the grid)
    coords = {}
    for t, k in (("20x", 1), ("10x", 2), ("5x", 4)):
        cells = rng.choice(400, size=30, replace=False)
        coords[t] = np.stack([np.rint((cells % 20) * k * f), np.rint((cells // 20) * k * f)], 1).astype(np.int64)
    side = tile_sides(coords)
    for t, k in (("20x", 1), ("10x", 2), ("5x", 4)):
        assert abs(side[t] - k * f) <= k  # the 1-px rounding of the grid, scaled
    one = {"20x": np.array([[100, 200]]), "5x": np.array([[0, 0]])}
    assert tile_sides(one) == {"20x": 0.0, "5x": 0.0}  # no step to read: no offset
    only_coarse = {"20x": np.array([[0, 0]]), "5x": np.array([[0, 0], [1790, 0]])}
    assert tile_sides(only_coarse) == {"20x": 1790 / 4, "5x": 1790.0}


def test_bags_in_memory_equal_bags_loaded_from_stores(cohort):
    """The benchmarks' in-memory bags are the bags training reads from feature stores."""
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, MODEL["n_groups"])
    mem, _ = synth_bags(tiny_cfg(), MODEL["n_groups"])
    for b in mem[:5]:
        sid = b.slide_id.rsplit("-", 1)[0]
        stored = cache[sid]
        assert b.label == stored.label
        for t in MAGS:
            assert torch.equal(b.feats[t], stored.feats[t]) and torch.equal(b.group[t], stored.group[t])
            assert torch.equal(b.xy[t], stored.xy[t]) and np.array_equal(b.coords[t], stored.coords[t])
            np.testing.assert_allclose(b.xy[t].numpy(), stored.coords[t] + TILE_PX[t] / 2)  # tile centres
    batch, _ = collate([mem[0], mem[1]], list(MAGS))
    n0 = len(mem[0].feats["5x"])
    assert batch["xy"]["5x"].shape[:2] == batch["mask"]["5x"].shape
    assert torch.equal(batch["xy"]["5x"][0, :n0], mem[0].xy["5x"])


def test_failed_tiles_dropped_from_bags(tmp_path):
    c = make_cohort(tmp_path, tiny_cfg(n_slides=3, failed_tiles=0.2))
    cache, _ = cohort_cache(c.sheet, c.feature_dirs, 4)
    for sid in c.slides:
        _, sets = read_feature_store(c.feature_dir / f"{sid}.zarr")
        bag = cache[sid]
        for t in MAGS:
            keep = ~sets[t].failed
            assert 0 < keep.sum() < len(keep) or len(keep) < 5
            assert np.array_equal(bag.feats[t].numpy(), sets[t].features[keep])
            assert np.array_equal(bag.coords[t], sets[t].coords[keep]) and len(bag.group[t]) == keep.sum()


def test_failed_stores_left_out_with_warning(cohort, caplog):
    cache, _ = cohort_cache(cohort.sheet, cohort.feature_dirs, 4)
    with caplog.at_level(logging.WARNING, logger="pipeline.mil.bags"):
        ok = cache.usable(cohort.slides)
    failed = [s for s, k in cohort.kinds.items() if k == "failed"]
    assert len(failed) == 2 and not set(failed) & set(ok)
    assert all(any(s in r.getMessage() and "left out" in r.getMessage() for r in caplog.records) for s in failed)


# --------------------------------------------------------------------------- splits


def _rows(n_patients=40, seed=0, split=False) -> list[SlideRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "tumor" if rng.random() < 0.4 else "normal"
        sp = ("test" if p % 4 == 0 else "train") if split else None
        for k in range(int(rng.integers(1, 4))):  # 1-3 slides per patient
            rows.append(SlideRow(f"s{p}_{k}", Path("/x"), label, f"p{p}", None, sp))
    return rows


def test_splits_patient_level_stratified_reproducible(tmp_path):
    rows = _rows()
    df = make_splits(rows, k=5, val_fraction=0.2, seed=1)
    folds = fold_names(df)
    assert len(folds) == 5
    overall = (df["label"] == "tumor").mean()
    tested = []
    for f in folds:
        assert set(df[f]) == {"train", "val", "test"}
        # a patient never sits in two parts of one fold
        assert (df.groupby("patient_id")[f].nunique() == 1).all()
        test = df[df[f] == "test"]
        tested += list(test["slide_id"])
        assert abs((test["label"] == "tumor").mean() - overall) < 0.2  # stratified
        assert set(test["label"]) == {"normal", "tumor"} and set(df[df[f] == "val"]["label"]) == {"normal", "tumor"}
    assert sorted(tested) == sorted(df["slide_id"])  # every slide tested exactly once
    assert df.equals(make_splits(rows, k=5, val_fraction=0.2, seed=1))  # reproducible
    assert not df.equals(make_splits(rows, k=5, val_fraction=0.2, seed=2))
    out = tmp_path / "splits.tsv"
    write_splits(rows, out, k=5, seed=1)
    again = read_splits(out)
    assert list(again.columns) == list(df.columns) and (again[folds].to_numpy() == df[folds].to_numpy()).all()


def test_splits_respect_split_column():
    rows = _rows(seed=3, split=True)
    df = make_splits(rows, k=3, val_fraction=0.2, seed=0)
    is_test = {r.slide_id: r.split == "test" for r in rows}
    vals = []
    for f in fold_names(df):
        assert all((v == "test") == is_test[s] for s, v in zip(df["slide_id"], df[f]))
        assert (df.groupby("patient_id")[f].nunique() == 1).all()
        assert (df[f] == "val").any()
        vals.append(frozenset(df.loc[df[f] == "val", "slide_id"]))
    assert len(set(vals)) > 1  # a different validation part per fold, the same test set


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", ["m2otca", "abmil_3"])
def test_padded_batch_equals_bags_one_at_a_time(loaded, name):
    cache, classes, ids = loaded
    torch.manual_seed(0)
    model = create_model(name, {t: 16 for t in MAGS}, 2, ModelConfig.from_dict(MODEL)).eval()
    bags = [cache[s] for s in ids[:4]]
    assert len({len(b.feats["20x"]) for b in bags}) > 1  # really padded
    batch, labels = collate(bags, list(MAGS))
    for t in MAGS:
        lens = batch["mask"][t].sum(1)
        assert lens.tolist() == [len(b.feats[t]) for b in bags]
        assert (batch["group"][t][~batch["mask"][t]] == -1).all() and (batch["feats"][t][~batch["mask"][t]] == 0).all()
    assert labels.tolist() == [b.label for b in bags]
    with torch.no_grad():
        together = model(batch)
        for i, b in enumerate(bags):
            alone = model(collate([b], list(MAGS))[0])
            torch.testing.assert_close(together["logits"][i], alone["logits"][0], atol=1e-5, rtol=1e-5)
            for t in MAGS:
                n = len(b.feats[t])
                torch.testing.assert_close(together["tile_attention"][t][i, :n], alone["tile_attention"][t][0],
                                           atol=1e-5, rtol=1e-5)
                assert (together["tile_attention"][t][i, n:] == 0).all()


def test_prefetch_iterator_same_batches_and_errors(loaded):
    cache, _, ids = loaded
    chunks = [ids[i : i + 3] for i in range(0, 12, 3)]
    plain = list(iter_batches(cache, chunks, list(MAGS), prefetch=0))
    ahead = list(iter_batches(cache, chunks, list(MAGS), prefetch=2))
    assert len(plain) == len(ahead) == 4
    for (b1, x1, y1), (b2, x2, y2) in zip(plain, ahead):
        assert [b.slide_id for b in b1] == [b.slide_id for b in b2] and torch.equal(y1, y2)
        assert all(torch.equal(x1[k][t], x2[k][t]) for k in x1 for t in MAGS)
    with pytest.raises(KeyError):  # an error in the loading thread reaches the consumer
        list(iter_batches(cache, [ids[:2], ["no-such-slide"]], list(MAGS), prefetch=2))
    it = iter_batches(cache, chunks, list(MAGS), prefetch=1)
    next(it)
    it.close()  # a consumer that stops early stops the thread


# --------------------------------------------------------------------------- training and evaluation


def test_fixed_seed_reproduces_checkpoint_and_metrics(cohort, loaded, tmp_path):
    cache, classes, ids = loaded
    train_ids, val_ids = _parts(ids, cohort.labels)
    outs = []
    for run, prefetch in (("a", 2), ("b", 2), ("c", 0)):
        ckpt = _train(cache, classes, train_ids, val_ids, tmp_path / run / "train", prefetch=prefetch)
        evaluate_fold(ckpt, cache, val_ids, tmp_path / run / "eval")
        saved = torch.load(tmp_path / run / "train" / "checkpoint.pt", weights_only=False)
        outs.append((saved, (tmp_path / run / "eval" / "metrics.json").read_bytes(),
                     (tmp_path / run / "eval" / "predictions.csv").read_bytes()))
    ref = outs[0]
    for saved, metrics, preds in outs[1:]:  # run twice: identical; without prefetching: identical too
        assert saved["best_epoch"] == ref[0]["best_epoch"]
        assert saved["state_dict"].keys() == ref[0]["state_dict"].keys()
        assert all(torch.equal(saved["state_dict"][k], ref[0]["state_dict"][k]) for k in saved["state_dict"])
        assert metrics == ref[1] and preds == ref[2]
    assert (tmp_path / "a" / "train" / "history.tsv").read_bytes() == (tmp_path / "b" / "train" / "history.tsv").read_bytes()


def _expected_best_and_length(hist: pd.DataFrame, patience: int, min_epochs: int) -> tuple[int, int]:
    best, best_epoch, stale = (-np.inf, np.inf), -1, 0
    for e, row in hist.iterrows():
        score = (row["val_auc"] if np.isfinite(row["val_auc"]) else 0.5, row["val_loss"])
        if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
            best, best_epoch, stale = score, e, 0
        else:
            stale += 1
            if stale >= patience and e + 1 >= min_epochs:
                return best_epoch, e + 1
    return best_epoch, len(hist)


def test_early_stopping_keeps_best_val_auc_epoch(cohort, loaded, tmp_path):
    cache, classes, ids = loaded
    train_ids, val_ids = _parts(ids, cohort.labels)
    ckpt = _train(cache, classes, train_ids, val_ids, tmp_path, model="abmil_3", epochs=12, patience=2,
                  min_epochs=3, lr=5e-3)
    hist = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    best_epoch, length = _expected_best_and_length(hist, 2, 3)
    assert len(hist) == length and ckpt["best_epoch"] == best_epoch
    assert length < 12 and best_epoch < length - 1  # it did stop early, and kept an earlier epoch
    assert hist["val_auc"].fillna(0.5).max() == pytest.approx(hist["val_auc"].fillna(0.5)[best_epoch])
    # the kept weights are that epoch's: they reproduce its validation AUC and loss
    from pipeline.mil.train import load_model

    res = predict(load_model(ckpt), cache, val_ids, list(MAGS), 3)
    y = np.array([cache.labels[s] for s in val_ids])
    assert classification_metrics(y, res["prob"], classes)["auc"] == pytest.approx(hist["val_auc"][best_epoch])
    loss = -np.log(np.clip(res["prob"][np.arange(len(y)), y], 1e-8, None)).mean()
    assert loss == pytest.approx(hist["val_loss"][best_epoch], rel=1e-5)
    for key in ("train_config", "model_config", "seed", "package_version", "in_dims", "classes", "mags"):
        assert key in ckpt
    assert ckpt["device"] == ("cpu" if not torch.cuda.is_available() else ckpt["device"])
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())  # loadable anywhere


def test_device_resolution_is_one_rule(monkeypatch):
    """Extraction, training and prediction resolve `device` alike: auto falls back to the CPU,
    a device this machine lacks or a name torch does not know is a one-line ConfigError."""
    from pipeline.deploy import predict
    from pipeline.devices import resolve_device
    from pipeline.errors import ConfigError
    from pipeline.features import extract
    from pipeline.mil import train
    from pipeline.mil.train import to_device

    assert extract.resolve_device is resolve_device and train.resolve_device is resolve_device
    assert "pick_device" not in vars(extract) and "resolve_device" not in vars(predict)  # no second copy
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="^device 'cuda:1' asked for, but this machine has no usable CUDA device$"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="^device 'tpu' is not a torch device name"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="'cuda:1' asked for, but this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    batch, labels = {"feats": {"20x": torch.zeros(1, 2, 3)}}, torch.tensor([1])
    assert to_device(batch, labels, torch.device("cpu"))[0] is batch  # nothing copied on the CPU
    assert to_device(batch, labels, torch.device("meta"))[0]["feats"]["20x"].device.type == "meta"


def test_evaluate_fold_outputs(cohort, loaded, tmp_path):
    cache, classes, ids = loaded
    train_ids, val_ids = _parts(ids, cohort.labels)
    ckpt = _train(cache, classes, train_ids, val_ids, tmp_path / "train", epochs=2)
    m = evaluate_fold(ckpt, cache, val_ids, tmp_path / "eval")
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(pred.columns[:4]) == ["slide_id", "label", "prob_normal", "prob_tumor"]
    assert list(pred["slide_id"]) == val_ids and list(pred["label"]) == [cohort.labels[s] for s in val_ids]
    assert np.allclose(pred[["prob_normal", "prob_tumor"]].sum(axis=1), 1, atol=1e-5)
    assert {f"logit_{t}_{c}" for t in MAGS for c in classes} <= set(pred.columns)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(METRICS) <= set(saved) and saved["model"] == "m2otca" and saved["n_test"] == len(val_ids)
    y = (pred["label"] == "tumor").to_numpy()
    assert saved["auc"] == pytest.approx(roc_auc_score(y, pred["prob_tumor"]))
    assert saved["acc"] == pytest.approx(((pred["prob_tumor"] > pred["prob_normal"]) == y).mean())
    assert m == saved
    att = np.load(tmp_path / "eval" / "attention.npz")
    assert att[f"{val_ids[0]}|20x|attention"].shape == (len(cache[val_ids[0]].feats["20x"]),)


def test_cross_attention_read_outs_in_history_predictions_and_figure(cohort, loaded, tmp_path):
    from pipeline.report.crossattn import plot_cross_attention

    cache, classes, ids = loaded
    train_ids, val_ids = _parts(ids, cohort.labels)
    models = tmp_path / "models"
    for name in ("m2otca", "abmil_3"):
        ckpt = _train(cache, classes, train_ids, val_ids, models / name / "fold_0", model=name, epochs=2)
        evaluate_fold(ckpt, cache, val_ids, models / name / "fold_0")
    hist = pd.read_csv(models / "m2otca" / "fold_0" / "history.tsv", sep="\t")
    pred = pd.read_csv(models / "m2otca" / "fold_0" / "predictions.csv")
    read_outs = {"ot_aligned_10x", "ot_aligned_5x", "ot_support_10x", "ot_support_5x", "gw_peak", "gw_top10"}
    assert read_outs <= set(hist.columns) and read_outs <= set(pred.columns)
    assert ((hist["ot_aligned_5x"] > 0) & (hist["ot_aligned_5x"] <= 1)).all()
    assert (pred["gw_top10"].between(0.1 - 1e-6, 1)).all() and (pred["ot_support_5x"] >= 1 - 1e-6).all()
    assert not read_outs & set(pd.read_csv(models / "abmil_3" / "fold_0" / "history.tsv", sep="\t").columns)
    out = tmp_path / "xattn.png"
    assert plot_cross_attention([models / "m2otca", models / "abmil_3"], out, n_groups=4) == 1
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[0] > 200  # one row of panels
    assert plot_cross_attention([models / "abmil_3"], tmp_path / "none.png") == 0


def test_three_classes_macro_ovr_auc(tmp_path):
    c3 = make_cohort(tmp_path / "c3", tiny_cfg(n_slides=18, classes=("a", "b", "c"), positive_fraction=0.67, seed=5))
    cache, classes = cohort_cache(c3.sheet, c3.feature_dirs, MODEL["n_groups"])
    ids = cache.usable(c3.slides)
    assert classes == ["a", "b", "c"] and set(c3.labels.values()) == {"a", "b", "c"}
    ckpt = _train(cache, classes, ids, ids[:9], tmp_path / "train", model="abmil_3", epochs=2)
    m = evaluate_fold(ckpt, cache, ids, tmp_path / "eval")
    pred = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    prob = pred[["prob_a", "prob_b", "prob_c"]].to_numpy()
    y = pred["label"].map({"a": 0, "b": 1, "c": 2}).to_numpy()
    assert np.isfinite(m["auc"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    ovr = np.mean([roc_auc_score(y == k, prob[:, k]) for k in range(3)])
    assert m["auc"] == pytest.approx(ovr)  # macro one-vs-rest, by hand
    # and classification_metrics on a hand-made case
    y3 = np.array([0, 1, 2, 0, 1, 2])
    p3 = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    got = classification_metrics(y3, p3, ["a", "b", "c"])
    assert got["auc"] == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"))
    assert got["acc"] == pytest.approx(4 / 6)


def test_cli_splits_train_evaluate_summarize(cohort, tmp_path, capsys):
    from pipeline.cli import main

    feats = [f"--features={t}={cohort.feature_dir}" for t in MAGS]
    splits = tmp_path / "splits.tsv"
    assert main(["-q", "splits", "--sheet", str(cohort.sheet), "--out", str(splits), "--folds", "2", "--seed", "1"]) == 0
    training = json.dumps({"epochs": 2, "batch_size": 4, "lr": 1e-3, "model": MODEL})
    metric_files = []
    for model in ("m2otca", "abmil_3"):
        run = tmp_path / model / "fold_0"
        common = ["--sheet", str(cohort.sheet), "--splits", str(splits), "--fold", "fold_0", *feats]
        assert main(["-q", "train", *common, "--out", str(run), "--model", model, "--training", training]) == 0
        assert main(["-q", "evaluate", *common, "--out", str(run), "--checkpoint", str(run / "checkpoint.pt")]) == 0
        m = json.loads((run / "metrics.json").read_text())
        assert set(METRICS) <= set(m)
        pred = pd.read_csv(run / "predictions.csv")
        assert {"slide_id", "label", "prob_normal", "prob_tumor"} <= set(pred.columns)
        failed = {s for s, k in cohort.kinds.items() if k == "failed"}
        assert not failed & set(pred["slide_id"])  # failed stores left out
        ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
        assert not failed & set(ckpt["train_ids"] + ckpt["val_ids"])
        metric_files.append(run / "metrics.json")
    capsys.readouterr()
    out = tmp_path / "summary.tsv"
    assert main(["-q", "summarize-metrics", *map(str, metric_files), "--out", str(out)]) == 0
    assert "p_auc_vs_m2otca" in pd.read_csv(out, sep="\t").columns and "±" in capsys.readouterr().out
