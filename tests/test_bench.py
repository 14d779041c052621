"""The benchmark scripts' interfaces other tools rely on (tiny sizes: what is printed, not the figures)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads` sets torch's global thread count: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("step_tiles,pin", [(0, False), (4, True)])
def test_train_step_last_line(tmp_path, capsys, step_tiles, pin):
    if pin and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--pin needs 2 CPUs")
    mod = _load("train_step")
    before = os.sched_getaffinity(0)
    mod.main(["--dim", "16", "--reps", "1", "--warmup", "0", "--epoch-slides", "8", "--epoch-repeats", "1",
              "--cohort-dir", str(tmp_path), "--threads", "2", "--epoch-step-tiles", str(step_tiles)]
             + ["--pin"] * pin)
    *_, repeat, settings, last = capsys.readouterr().out.strip().splitlines()
    # 8 slides, fewer than BagCache.READ_AHEAD_MIN: no reader process, every bag read in the trainer
    assert repeat.strip().startswith("repeat 0: ") and repeat.endswith("; 0 of 8 bags read by the reader process")
    # the epoch's step on one thread (the loader has the other core), the step alone on --threads
    assert " threads=2 " in settings
    assert settings.endswith(f"epoch_threads=1 epoch_step_tiles={step_tiles} loader=child pin={int(pin)}")
    assert os.sched_getaffinity(0) == before  # --pin gives the CPUs back
    m = re.fullmatch(r"step_ms=([\d.]+) attention_ms=([\d.]+) ratio=([\d.]+) epoch_ratio=([\d.]+)", last)
    assert m, last
    step, att, ratio, epoch = map(float, m.groups())
    assert step > 0 and att > 0 and ratio == pytest.approx(step / att, abs=2e-3)
    assert math.isfinite(epoch) and epoch > 0.5


def test_loader_gil_last_line(tmp_path, capsys):
    _load("loader_gil").main(["--slides", "8", "--dim", "16", "--step-tiles", "4", "--steps", "2", "--repeats", "1",
                              "--rate", "1000", "--cohort-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in out if line.startswith("repeat 0 ")]) == 5
    m = re.fullmatch(r"load=([\d.]+) unpickle=([\d.]+) receive=([\d.]+) stat=([\d.]+) copy=([\d.]+)", out[-1])
    assert m, out[-1]
    assert all(float(v) > 0 for v in m.groups())


def test_train_step_epoch_skipped_is_nan(capsys):
    _load("train_step").main(["--dim", "16", "--reps", "1", "--warmup", "0", "--epoch-slides", "0", "--threads", "1"])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("epoch_ratio=nan")


def test_multiscale_benchmark_tables_and_last_line(tmp_path, capsys):
    mod = _load("multiscale_benchmark")
    mod.main(["--out", str(tmp_path), "--seeds", "2", "--train-sizes", "30", "--test-size", "40",
              "--models", "m2otca,abmil_3", "--jobs", "1", "--epochs", "2", "--patience", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    keys = ["coloc_auc_m2otca", "coloc_auc_abmil3", "delta", "delta_ci_low", "shuffled_auc_m2otca",
            "control_delta", "ceiling"]
    m = re.fullmatch(" ".join(f"{k}=(-?[\\d.]+|nan)" for k in keys), out[-1])
    assert m, out[-1]
    vals = dict(zip(keys, map(float, m.groups())))
    assert 0 <= vals["coloc_auc_m2otca"] <= 1 and vals["delta_ci_low"] <= vals["delta"]
    assert vals["delta"] == pytest.approx(vals["coloc_auc_m2otca"] - vals["coloc_auc_abmil3"], abs=1e-9)
    runs = __import__("pandas").read_csv(tmp_path / "runs.tsv", sep="\t")
    assert len(runs) == 3 * 2 * 2  # three tasks x two seeds x two models
    assert runs.loc[runs.model == "m2otca", "ot_aligned_5x"].between(0, 1).all()
    summary = (tmp_path / "summary.md").read_text()
    assert "### coloc, 30 training slides, 2 seeds, 40 test slides" in summary and "per-scale ceiling" in summary


def test_pretrain_last_line(tmp_path, capsys):
    from conftest import shared_slide

    from pipeline.config import TilingConfig
    from pipeline.tiling.stage import tile_to_store

    store = tmp_path / "cmu.tiles.zarr"
    tile_to_store(shared_slide("CMU-1-Small-Region.svs"), store, TilingConfig())
    _load("pretrain").main([str(store), "--crop", "64", "--batch-size", "4", "--steps", "2", "--workers", "0",
                            "--device", "cpu"])
    settings, last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert settings.startswith("device=cpu crop=64 batch=4 ")
    m = re.fullmatch(r"train_ips=([\d.]+) fb_ips=([\d.]+) ratio=([\d.]+)", last)
    assert m, last
    train, fb, ratio = map(float, m.groups())
    assert train > 0 and fb > 0 and ratio == pytest.approx(train / fb, rel=0.05)  # printed rates are rounded
