"""What the report outputs hold: attention heatmaps (pixels), the run manifest (values) and the
tile summary tables (rows and columns), from hand-made inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_tiff

import pipeline
from pipeline.report import manifest
from pipeline.report.heatmap import attention_canvas, load_attention, render_heatmap
from pipeline.report.summary import summarize_stores, write_summary
from pipeline.store import TileSet, TileStoreMeta, write_failed_store, write_tile_store

# --------------------------------------------------------------------------- heatmaps


def test_attention_canvas_paints_rank_scaled_tiles_at_their_coordinates():
    coords = np.array([[0, 0], [64, 0], [0, 64]])  # level-0 px, tiles of 64 px, scale 4 -> 16 px
    canvas = attention_canvas((40, 40), 4.0, coords, np.array([0.2, 0.9, 0.3]), 64)
    np.testing.assert_array_equal(canvas[:16, :16], 0.0)  # lowest attention -> rank 0
    np.testing.assert_array_equal(canvas[:16, 16:32], 1.0)  # highest -> 1
    np.testing.assert_array_equal(canvas[16:32, :16], 0.5)
    assert np.isnan(canvas[16:, 16:]).all() and np.isnan(canvas[32:]).all()  # no tile there
    assert np.isnan(attention_canvas((4, 4), 1.0, coords[:0], np.zeros(0), 64)).all()


def _panel(png: Path) -> np.ndarray:
    """The first axes' image of a saved figure: the bounding box of its leftmost block of
    mostly non-white columns (the colorbar is a separate block to its right)."""
    import matplotlib.image

    img = (matplotlib.image.imread(png)[..., :3] * 255).astype(int)  # (H, W, 3)
    ink = (img < 235).any(-1)
    cols = ink.sum(0) > 0.5 * ink.sum(0).max()
    x0 = int(np.argmax(cols))
    x1 = x0 + int(np.argmax(~cols[x0:]))
    rows = ink[:, x0:x1].sum(1) > 0.5 * (x1 - x0)
    y0 = int(np.argmax(rows))
    y1 = y0 + int(np.argmax(~rows[y0:]))
    return img[y0:y1, x0:x1]


def test_heatmap_paints_high_attention_brighter_at_the_tiles_place(tmp_path):
    slide = write_tiff(tmp_path / "grey.tif", np.full((512, 512, 3), 128, np.uint8), mpp=0.5)
    coords = np.array([[0, 0], [256, 0], [0, 256]])  # top-left, top-right, bottom-left quadrants
    attn = np.array([0.01, 0.3, 0.69])  # ranks 0, 0.5, 1; the bottom-right quadrant has no tile
    np.savez(tmp_path / "attention.npz", **{"s1|20x|attention": attn, "s1|20x|coords": coords})
    per_slide = load_attention(tmp_path / "attention.npz")
    assert list(per_slide) == ["s1"] and list(per_slide["s1"]) == ["20x"]
    render_heatmap(slide, per_slide["s1"], {"20x": 256}, tmp_path / "s1.png", max_side=256)
    panel = _panel(tmp_path / "s1.png")
    h, w = panel.shape[:2]
    assert abs(h - w) <= 2  # the square slide, whole

    def at(fx: float, fy: float) -> np.ndarray:  # mean RGB around a point given as fractions of the slide
        y, x = int(fy * h), int(fx * w)
        return panel[y - 3 : y + 4, x - 3 : x + 4].reshape(-1, 3).mean(0)

    low, mid, high, none = at(0.25, 0.25), at(0.75, 0.25), at(0.25, 0.75), at(0.75, 0.75)
    assert high.sum() > mid.sum() + 60 > low.sum() + 120  # brightness follows the attention rank
    assert high[0] > high[2] + 20 and high[1] > high[2] + 20  # inferno's top end is yellow
    np.testing.assert_allclose(none, 128, atol=6)  # off the tiles: the slide itself shows


# --------------------------------------------------------------------------- run manifest


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_manifest_values(tmp_path, monkeypatch):
    sheet = tmp_path / "slides.tsv"
    sheet.write_text("slide_id\tpath\tlabel\na\ta.svs\ttumor\n")
    config = {"splits": {"seed": 7, "k": 5}, "training": {"seed": 3},
              "features": {"encoders": ["resnet18_simclr", "uni"]}}
    monkeypatch.setattr(manifest, "PACKAGES", ("numpy", "no-such-package-m2otca"))
    m = manifest.build_manifest(config, sheet, tmp_path, {"uni": "ab" * 32})
    assert m["pipeline_version"] == pipeline.__version__
    assert m["git_commit"] == "unknown"  # not a git checkout
    assert m["packages"] == {"numpy": version("numpy"), "no-such-package-m2otca": "not installed"}
    assert m["sheet"] == str(sheet) and m["sheet_sha256"] == hashlib.sha256(sheet.read_bytes()).hexdigest()
    assert m["seeds"] == {"splits": 7, "training": 3}
    assert m["encoders"] == ["resnet18_simclr", "uni"] and m["weights_sha256"] == {"uni": "ab" * 32}
    assert m["config"] == config
    # the config hash ignores key order and sees every value
    reordered = {"features": config["features"], "training": {"seed": 3}, "splits": {"k": 5, "seed": 7}}
    assert manifest.config_hash(reordered) == m["config_sha256"]
    assert manifest.config_hash({**config, "training": {"seed": 4}}) != m["config_sha256"]
    manifest.write_manifest(tmp_path / "manifest.json", m)
    assert json.loads((tmp_path / "manifest.json").read_text()) == m


def test_manifest_git_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("1")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert manifest.git_commit(repo) == head
    (repo / "untracked.txt").write_text("x")
    assert manifest.git_commit(repo) == head  # untracked files do not make it dirty
    (repo / "a.txt").write_text("2")
    assert manifest.git_commit(repo) == head + "-dirty"


# --------------------------------------------------------------------------- tile summary


def _tiles(n: int) -> TileSet:
    return TileSet(coords=np.arange(2 * n).reshape(n, 2) * 64, grid=np.zeros((n, 2), np.int32),
                   tissue=np.ones(n, np.float32), region=np.arange(n, dtype=np.int32), parent=np.full(n, -1))


@pytest.fixture
def stores(tmp_path) -> list[Path]:
    t, f = tmp_path / "tiles", tmp_path / "features"
    write_tile_store(t / "a.zarr", {"20x": _tiles(5), "10x": _tiles(2)},
                     TileStoreMeta(slide_id="a", base_mpp=0.25, mpp_source="tiff", vendor="aperio"))
    write_tile_store(t / "b.zarr", {"20x": _tiles(0), "10x": _tiles(0)},
                     TileStoreMeta(slide_id="b", base_mpp=0.5, mpp_source="sheet", vendor="generic-tiff"))
    write_failed_store(t / "c.zarr", "tiles", "c", "c.svs: cannot open")
    write_failed_store(f / "c.zarr", "features", "c", "no tile store")
    broken = t / "d.zarr"
    broken.mkdir(parents=True)
    (broken / "zarr.json").write_text("{not json")
    return [t / "a.zarr", t / "b.zarr", t / "c.zarr", t / "d.zarr", t / "e.zarr", f / "c.zarr"]


def test_summary_rows_and_failed_table(stores, tmp_path):
    df = summarize_stores(stores)
    assert list(df.columns) == ["slide_id", "stage", "status", "base_mpp", "mpp_source", "vendor", "error",
                                "tiles_20x", "tiles_10x"]
    assert df["slide_id"].tolist() == ["a", "b", "c", "d", "e", "c"]
    assert df["stage"].tolist() == ["tiles", "tiles", "tiles", "?", "?", "features"]
    assert df["status"].tolist() == ["ok", "ok", "failed", "broken", "missing", "failed"]
    assert df["tiles_20x"].tolist()[:2] == [5, 0] and df["tiles_10x"].tolist()[:2] == [2, 0]
    assert df["tiles_20x"].isna().tolist() == [False, False, True, True, True, True]
    assert df["base_mpp"].tolist()[:2] == [0.25, 0.5] and df["vendor"].tolist()[:2] == ["aperio", "generic-tiff"]
    assert df["error"].tolist() == ["", "", "c.svs: cannot open", f"store is broken: {stores[3]}",
                                    f"store is missing: {stores[4]}", "no tile store"]

    write_summary(stores, tmp_path / "summary.tsv", tmp_path / "failed.tsv")
    table = pd.read_csv(tmp_path / "summary.tsv", sep="\t", keep_default_na=False)
    assert table["slide_id"].tolist() == ["a", "b", "c", "d", "e", "c"]
    assert table["tiles_20x"].tolist() == ["5", "0", "", "", "", ""]  # integers (not 5.0), empty when unknown
    failed = pd.read_csv(tmp_path / "failed.tsv", sep="\t", keep_default_na=False)
    assert list(failed.columns) == ["slide_id", "stage", "error"]
    assert failed.values.tolist() == [["c", "tiles", "c.svs: cannot open"],  # the earliest stage that failed
                                      ["d", "?", f"store is broken: {stores[3]}"],
                                      ["e", "?", f"store is missing: {stores[4]}"]]


def test_summary_of_healthy_cohort_has_an_empty_failed_table(stores, tmp_path):
    write_summary(stores[:2], tmp_path / "summary.tsv", tmp_path / "failed.tsv")
    failed = pd.read_csv(tmp_path / "failed.tsv", sep="\t")
    assert list(failed.columns) == ["slide_id", "stage", "error"] and failed.empty
