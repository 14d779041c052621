"""Cohort feature QC: Dask statistics match numpy, a planted site shift is flagged (and no shift
is not), empty / thin / failed / outlying slides are listed, a one-site column is one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.report.cohort_qc import QCConfig, cohort_qc, feature_stats
from pipeline.slides.sheet import SlideRow
from pipeline.store import TileSet, open_features_dask, read_feature_store, write_failed_store
from pipeline.synthetic.bags import MAGS, SynthConfig, make_slide, write_slide

TINY = dict(dim=12, regions=(6, 10), lesion_regions=(1, 2))
FAST = QCConfig(permutations=50, batch_alpha=0.05)


def _cohort(d: Path, n: int, shift_site_b: float = 0.0, seed: int = 0, sites=None, chunk_rows=64) -> list[SlideRow]:
    """n synthetic slides, sites A/B alternating; site B's features shifted by `shift_site_b` along one direction."""
    cfg = SynthConfig(n_slides=n, seed=seed, **TINY)
    direction = np.random.default_rng(99).normal(size=cfg.dim)
    direction /= np.linalg.norm(direction)
    rows = []
    for i in range(n):
        site = sites[i] if sites is not None else "AB"[i % 2]
        s = make_slide(i, cfg, i % 2 if sites is None else (i // 2) % 2, f"p{i}")
        if site == "B" and shift_site_b:
            s.feats = {t: (f.astype(np.float32) + shift_site_b * direction).astype(np.float16) for t, f in s.feats.items()}
        write_slide(s, d / f"{s.slide_id}.zarr", chunk_rows=chunk_rows)
        rows.append(SlideRow(s.slide_id, Path("/x"), s.label, f"p{i}", site=site))
    return rows


def test_dask_statistics_are_numpys(tmp_path):
    rows = _cohort(tmp_path, 4, chunk_rows=16)
    f, failed = open_features_dask(tmp_path / f"{rows[0].slide_id}.zarr", ["20x"])["20x"]
    assert f.dtype == np.float16 and f.chunks[0][0] == 16 and failed.dtype == bool  # lazy, chunked as stored
    stats = feature_stats(rows, {m: tmp_path for m in MAGS}, QCConfig(stores_per_compute=3), tmp_path / "scratch")
    for i, r in enumerate(rows):
        _, sets = read_feature_store(tmp_path / f"{r.slide_id}.zarr")
        for m in MAGS:
            x = sets[m].features.astype(np.float64)[~sets[m].failed]
            assert stats[m].n_tiles[i] == len(x)
            assert np.allclose(stats[m].means[i], x.mean(0), rtol=1e-5)  # float32 on disk
            assert stats[m].spread[i] == pytest.approx(np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()))


@pytest.mark.parametrize("shift,flagged", [(1.5, True), (0.0, False)])
def test_planted_site_shift_is_flagged(tmp_path, shift, flagged):
    rows = _cohort(tmp_path, 24, shift_site_b=shift, seed=2)
    s = cohort_qc(rows, {m: tmp_path for m in MAGS}, tmp_path / "qc", FAST)
    b = s["batch_effect"]
    assert b["flagged"] is flagged and b["chance"] == 0.5 and b["sites"] == {"A": 12, "B": 12}
    assert (b["score"] > 0.9) if flagged else (b["score"] < 0.75 and b["p_value"] > 0.05)
    assert json.loads((tmp_path / "qc" / "cohort_qc.json").read_text())["batch_effect"]["flagged"] is flagged
    assert (tmp_path / "qc" / "cohort_pca.svg").read_text().count("<path") > 24


def _empty_tiles() -> dict[str, TileSet]:
    z = np.zeros((0, 2), np.int64)
    return {t: TileSet(z, z.astype(np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(0, np.int64))
            for t in MAGS}


def test_empty_thin_failed_and_outlying_slides_are_listed(tmp_path, caplog):
    rows = _cohort(tmp_path, 24, seed=5)
    cfg = SynthConfig(n_slides=24, seed=5, **TINY)
    # an outlier: one slide's features far from everyone's
    s = make_slide(3, cfg, 1, "p3")
    s.feats = {t: (f.astype(np.float32) + 25.0).astype(np.float16) for t, f in s.feats.items()}
    write_slide(s, tmp_path / f"{rows[3].slide_id}.zarr", chunk_rows=16)
    # no tiles at all; a few tiles (the first region only); a failed store
    from pipeline.synthetic.bags import SynthSlide

    empty = SynthSlide("empty", "pe", "normal", "none", _empty_tiles(), {t: np.zeros((0, 12), np.float16) for t in MAGS},
                       {t: np.zeros(0, bool) for t in MAGS})
    write_slide(empty, tmp_path / "empty.zarr")
    thin = make_slide(7, cfg, 0, "pt")
    thin.slide_id = "thin"
    keep = {t: thin.tiles[t].region == thin.tiles[t].region.min() for t in MAGS}
    for t in MAGS:
        k = keep[t]
        thin.tiles[t] = TileSet(*(getattr(thin.tiles[t], a)[k] for a in ("coords", "grid", "tissue", "region", "parent")))
        thin.feats[t], thin.failed[t] = thin.feats[t][k], thin.failed[t][k]
    write_slide(thin, tmp_path / "thin.zarr")
    write_failed_store(tmp_path / "broken.zarr", "features", "broken", "slide unreadable")
    rows += [SlideRow(s, Path("/x"), "normal", s) for s in ("empty", "thin", "broken")]
    with caplog.at_level(logging.WARNING, logger="pipeline.report.cohort_qc"):
        cohort_qc(rows, {m: tmp_path for m in MAGS}, tmp_path / "qc", FAST)
    out = pd.read_csv(tmp_path / "qc" / "cohort_outliers.tsv", sep="\t")
    reasons = {(r.slide_id, r.reason) for r in out.itertuples() if r.mag == "20x"}
    assert reasons == {(rows[3].slide_id, "outlier"), ("empty", "no tiles"), ("thin", "few tiles"),
                       ("broken", "failed store")}, out
    assert out[out["slide_id"] == "broken"]["detail"].iloc[0] == "feature store failed: slide unreadable"
    loud = [r.getMessage() for r in caplog.records]
    assert "cohort QC: empty 20x: NO TILES: no usable tile at this magnification" in loud
    assert any(m.startswith(f"cohort QC: {rows[3].slide_id} 20x: OUTLIER: mean's distance") for m in loud)
    table = pd.read_csv(tmp_path / "qc" / "cohort_features.tsv", sep="\t")
    assert len(table) == len(rows) * len(MAGS) and table.loc[table["slide_id"] == "empty", "n_tiles"].eq(0).all()


def test_one_site_is_one_line_and_cli(tmp_path, caplog):
    rows = _cohort(tmp_path / "f", 12, sites=["H1"] * 12)
    sheet = "slide_id\tpath\tpatient_id\tsite\n" + "".join(f"{r.slide_id}\tx.svs\t{r.patient_id}\tH1\n" for r in rows)
    (tmp_path / "s.tsv").write_text(sheet)  # no label column: QC does not need one
    with caplog.at_level(logging.WARNING, logger="pipeline.report.cohort_qc"):
        rc = main(["cohort-qc", "--sheet", str(tmp_path / "s.tsv"), "--out-dir", str(tmp_path / "qc"),
                   *[a for m in MAGS for a in ("--features", f"{m}={tmp_path / 'f'}")]])
    assert rc == 0
    assert [r.getMessage() for r in caplog.records] == ["cohort QC: site column: one site only (H1): no batch-effect score"]
    s = json.loads((tmp_path / "qc" / "cohort_qc.json").read_text())
    assert s["batch_effect"]["score"] is None and s["slides"] == 12


def test_bench_last_line(tmp_path, capsys):
    import importlib.util
    import re

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_cohort_qc", REPO / "bench" / "cohort_qc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--sizes", "6,3", "--dim", "8", "--cache", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"rss_mib_3=(\d+) rss_mib_6=(\d+) seconds_3=([\d.]+) seconds_6=([\d.]+) rss_ratio=([\d.]+)", last)
    assert m, last
    assert float(m[5]) == pytest.approx(int(m[2]) / int(m[1]), abs=0.01) and int(m[1]) > 50
    assert (tmp_path / "n6-d8" / "qc-3" / "cohort_outliers.tsv").exists()
