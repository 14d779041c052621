"""`snakemake predict` with a deploy config: a tiny trained run applied to new slides through the
workflow (the run's recorded tiling wins over the config's), identical on a rerun, a slide
whose features come from another encoder refused; QuPath exports and cohort QC alongside."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import snakemake_cmd, tissue_image, venv_env, write_cohort, write_tiff

from pipeline.store import read_attrs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN = ("splits: {folds: 2, val_fraction: 0}\nmodels: [abmil_3]\n"
         "training: {epochs: 1, min_epochs: 1, model: {n_groups: 4}}\ntiling: {tile_size: 64}\n"
         "features: {batch_size: 32}\nheatmaps: {n_auto: 0, model: abmil_3}\nqupath: {export: false}\n")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """The workflow with 4 job slots on 2 CPUs: these tiny jobs mostly wait on imports (one core each)."""
    return subprocess.run(snakemake_cmd(workdir, *args, cores=4), capture_output=True, text=True, cwd=workdir, env=venv_env())


def test_predict_new_slides_with_a_trained_run(tmp_path):
    slides = [(f"s{i}", write_tiff(tmp_path / f"s{i}.tif", tissue_image(700, 900, seed=i, blobs=4), mpp=0.5, levels=2),
               "tumor" if i % 2 else "normal") for i in range(4)]
    write_cohort(tmp_path, slides, TRAIN)
    r = snakemake(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "results" / "tiny"
    assert (run / "qc" / "cohort_outliers.tsv").exists()
    # new slides (other seeds); one without a label; the deploy config asks for other tiling: ignored
    new = [(f"n{i}", write_tiff(tmp_path / f"n{i}.tif", tissue_image(700, 900, seed=10 + i, blobs=4), mpp=0.5, levels=2))
           for i in range(3)]
    (tmp_path / "new.tsv").write_text("slide_id\tpath\tlabel\tpatient_id\n" + "".join(
        f"{s}\t{p}\t{['normal', 'tumor', ''][i]}\tq{i}\n" for i, (s, p) in enumerate(new)))
    (tmp_path / "deploy.yaml").write_text(
        f"cohort: ext\nslides: {tmp_path / 'new.tsv'}\ndemo: {{enabled: false}}\ntiling: {{tile_size: 128}}\n"
        "qupath: {export: true}\npredict: {run: results/tiny, bootstrap: 200, heatmaps: {n_auto: 1}}\n")
    r = snakemake(tmp_path, "predict", "--configfile", str(tmp_path / "deploy.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    ext = tmp_path / "results" / "ext"
    out = ext / "predictions" / "resnet18_simclr" / "abmil_3"
    pred = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert pred["slide_id"].tolist() == ["n0", "n1", "n2"] and pred["label"].tolist() == ["normal", "tumor", ""]
    assert {c for c in pred.columns if c.startswith("fold_")} == {f"fold_{k}_prob_{c}" for k in (0, 1) for c in ("normal", "tumor")}
    assert read_attrs(ext / "tiles" / "n0.zarr")["tiling"]["tile_size"] == 64  # the run's, not the config's
    assert json.loads((out / "metrics.json").read_text())["n_labelled"] == 2
    assert len(list((out / "heatmaps").glob("*.png"))) == 1
    summary = pd.read_csv(ext / "predictions" / "resnet18_simclr" / "summary.tsv", sep="\t")
    assert summary[["model", "slides", "refused"]].values.tolist() == [["abmil_3", 3, 0]]
    assert (ext / "qupath" / "n1.geojson").exists() and (ext / "qc" / "cohort_pca.svg").exists()
    # features of another encoder on disk for n2: refused with one line; n0 and n1 predicted again,
    # the same bytes (a slide's prediction depends on nothing else)
    first = (out / "predictions.csv").read_text().splitlines()
    meta_path = ext / "features" / "resnet18_simclr" / "n2.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["encoder"] = "timm:resnet50"
    meta_path.write_text(json.dumps(meta))
    r = snakemake(tmp_path, "predict", "--configfile", str(tmp_path / "deploy.yaml"), "--forcerun", "predict_mil")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "logs" / "ext" / "predict_mil" / "abmil_3.log").read_text()
    assert "refused: n2: 20x features encoder timm:resnet50, the trained run's resnet18_simclr" in log
    assert (out / "predictions.csv").read_text().splitlines() == first[:3]
    assert pd.read_csv(out / "refused.tsv", sep="\t")["slide_id"].tolist() == ["n2"]
    # without Snakemake: `predict --prepare` tiles and extracts with the run's record, then predicts
    alone = tmp_path / "results" / "alone"
    (tmp_path / "one.tsv").write_text("\n".join((tmp_path / "new.tsv").read_text().splitlines()[:2]) + "\n")
    r = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--run", str(run), "--sheet", str(tmp_path / "one.tsv"),
                        "--results", str(alone), "--prepare", "--bootstrap", "0", "--heatmap-n", "0"],
                       capture_output=True, text=True, cwd=tmp_path, env=venv_env())
    assert r.returncode == 0, r.stderr[-3000:]
    again = pd.read_csv(alone / "predictions" / "resnet18_simclr" / "abmil_3" / "predictions.csv")
    assert read_attrs(alone / "tiles" / "n0.zarr")["tiling"] == read_attrs(ext / "tiles" / "n0.zarr")["tiling"]
    snk = pd.read_csv(io.StringIO("\n".join(first[:2])))
    assert np.allclose(again.filter(like="prob_").to_numpy(), snk.filter(like="prob_").to_numpy(), atol=1e-3)
