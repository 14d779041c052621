"""Aligned nested tiling: geometry invariants, tissue fractions, order, stores, CLI contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_slide, tissue_image, write_tiff
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import TilingConfig
from pipeline.store import read_tile_store, store_status
from pipeline.tiling.grid import area_fractions, make_grid, tile_grid
from pipeline.tiling.stage import tile_to_store

CFG = TilingConfig()


def check_invariants(tiles, grid, cfg):
    """Children inside parents, fractions in range, thresholds, spatial order by region."""
    names = list(tiles)
    for i, name in enumerate(names):
        ts = tiles[name]
        side = grid.finest_px * 2**i
        assert ts.coords.dtype == np.int64 and ts.grid.dtype == np.int32
        assert ((ts.tissue >= cfg.tissue_threshold - 1e-6) & (ts.tissue <= 1.0)).all()
        assert (np.diff(ts.region) >= 0).all(), "tiles must be sorted by region"
        key = ts.region.astype(np.int64) * 10**6 + (ts.grid[:, 0] % grid.cells_per_region(i)) * 1000 + ts.grid[:, 1] % grid.cells_per_region(i)
        assert (np.diff(key) > 0).all(), "inside a region, raster order"
        np.testing.assert_array_equal(ts.coords[:, 0], np.rint(ts.grid[:, 1] * side))
        if i + 1 < len(names):
            par = tiles[names[i + 1]]
            has = ts.parent >= 0
            p = ts.parent[has]
            np.testing.assert_array_equal(par.grid[p], ts.grid[has] // 2)
            np.testing.assert_array_equal(par.region[p], ts.region[has])
            # child footprint inside parent footprint, exactly (shared corners on the finest grid)
            psize = np.rint((par.grid[p] + 1) * side * 2) - par.coords[p][:, ::-1]
            assert (ts.coords[has] >= par.coords[p]).all()
            assert (ts.coords[has] + np.rint(side) <= par.coords[p] + psize[:, ::-1] + 1).all()
            # a kept parent with a kept child is found; a missing parent is -1
            dense = {tuple(g) for g in par.grid}
            missing = ~has
            assert all(tuple(g // 2) not in dense for g in ts.grid[missing])
        else:
            assert (ts.parent == -1).all()


def test_cmu_all_three_magnifications(cmu, tmp_path):
    out = tmp_path / "cmu.zarr"
    counts = tile_to_store(cmu, out, CFG, qc_png=tmp_path / "qc.png", mask_png=tmp_path / "mask.png")
    assert all(counts[m] > 0 for m in ("20x", "10x", "5x")), counts
    assert counts["20x"] > counts["10x"] > counts["5x"]
    store = read_tile_store(out)
    assert store.meta.mpp_source == "openslide" and store.meta.vendor == "aperio"
    assert store.meta.tiling["tissue_threshold"] == 0.35 and store.meta.layout_version == 1
    assert len(store.meta.slide_fingerprint) == 64
    grid = make_grid(2220, 2967, store.meta.base_mpp, CFG)
    check_invariants(store.tiles, grid, CFG)
    assert (tmp_path / "qc.png").stat().st_size > 10_000 and (tmp_path / "mask.png").exists()
    # a 10x tile with a kept 20x child covers that child's tissue
    t10 = store.tiles["10x"]
    assert (store.tiles["20x"].parent >= 0).any() and len(t10) > 0


def test_tissue_fraction_is_area_not_point():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :3] = 1  # left 3 of 8 columns
    integ = __import__("cv2").integral(mask, sdepth=__import__("cv2").CV_32S)
    f = area_fractions(integ, np.array([0.0, 2.5]), np.array([0.0, 0.0]), 8.0)
    assert f[0] == pytest.approx(3 / 8)
    assert f[1] == pytest.approx(0.5 * 8 / 64)  # half a column of tissue inside


def test_threshold_is_respected_per_magnification():
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :20] = 1
    cfg = TilingConfig(tile_size=16, tissue_threshold=0.35)
    grid = make_grid(64, 64, 1.0, cfg)  # finest tile = 16 * 0.5 / 1.0 = 8 level-0 px = 8 mask px
    tiles = tile_grid(mask, 1.0, grid, cfg)
    check_invariants(tiles, grid, cfg)
    assert set(tiles["20x"].grid[:, 1]) == {0, 1, 2}  # col 2 is 4/8 tissue: kept
    assert set(tiles["5x"].grid[:, 1]) == {0}  # 20/32 tissue


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 3000), h=st.integers(1, 3000), base=st.floats(0.1, 2.0),
    thr=st.floats(0.0, 1.0), scale=st.floats(1.0, 40.0), seed=st.integers(0, 2**16),
)
def test_fuzz_geometry(w, h, base, thr, scale, seed):
    cfg = TilingConfig(tissue_threshold=thr, tile_size=64)
    rng = np.random.default_rng(seed)
    mh, mw = max(1, int(np.ceil(h / scale))), max(1, int(np.ceil(w / scale)))
    mask = (rng.random((mh, mw)) < rng.random()).astype(np.uint8)
    grid = make_grid(w, h, base, cfg)
    tiles = tile_grid(mask, scale, grid, cfg)
    check_invariants(tiles, grid, cfg)
    for ts in tiles.values():
        assert (ts.coords >= 0).all()


def test_no_tissue_gives_empty_valid_store(tmp_path):
    blank = np.full((900, 1200, 3), 243, np.uint8)
    path = write_tiff(tmp_path / "blank.tif", blank, mpp=0.5, levels=2)
    counts = tile_to_store(path, tmp_path / "blank.zarr", CFG)
    assert counts == {"20x": 0, "10x": 0, "5x": 0}
    store = read_tile_store(tmp_path / "blank.zarr")
    assert all(len(t) == 0 and t.coords.shape == (0, 2) for t in store.tiles.values())


def test_slide_smaller_than_a_tile(tmp_path):
    path = write_tiff(tmp_path / "tiny.tif", tissue_image(100, 120, blobs=6), mpp=0.5, tiled=False)
    counts = tile_to_store(path, tmp_path / "tiny.zarr", CFG)
    assert store_status(tmp_path / "tiny.zarr") == "ok"
    assert counts["5x"] == 0  # a 100x120 px scan cannot fill 35 % of a 1024-px footprint


def test_rerun_replaces_store_atomically(tmp_path):
    path = write_tiff(tmp_path / "s.tif", tissue_image(1500, 1500), mpp=0.5, levels=2)
    out = tmp_path / "s.zarr"
    a = tile_to_store(path, out, CFG)
    b = tile_to_store(path, out, TilingConfig(tissue_threshold=0.9))
    assert b["20x"] < a["20x"]
    assert read_tile_store(out).meta.tiling["tissue_threshold"] == 0.9
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_target_finer_than_scan_refused(tmp_path):
    path = write_tiff(tmp_path / "coarse.tif", tissue_image(400, 400), mpp=1.0, tiled=False)
    with pytest.raises(Exception, match=r"target 20x \(0.5 µm/px\) is finer than the scan"):
        tile_to_store(path, tmp_path / "c.zarr", CFG)
    counts = tile_to_store(path, tmp_path / "c.zarr", TilingConfig(allow_upsample=True))
    assert "20x" in counts


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("name", ["broken/unreadable.svs", "broken/unopenable.tiff", "broken/broken.svs", "boxes.tiff"])
def test_cli_one_line_error(name, tmp_path):
    out = tmp_path / "x.zarr"
    r = run_cli("tile", shared_slide(name), "--out", out)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and name.split("/")[-1] in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_record_failure_and_mpp_override(tmp_path):
    boxes = shared_slide("boxes.tiff")
    r = run_cli("tile", boxes, "--out", tmp_path / "b.zarr", "--record-failure", "--qc", tmp_path / "qc.png")
    assert r.returncode == 0 and "boxes.tiff" in r.stderr
    assert store_status(tmp_path / "b.zarr") == "failed" and (tmp_path / "qc.png").exists()
    with pytest.raises(Exception, match="not a scan resolution"):
        read_tile_store(tmp_path / "b.zarr")
    r = run_cli("tile", boxes, "--out", tmp_path / "b2.zarr", "--mpp", "0.25")
    assert r.returncode == 0, r.stderr
    assert read_tile_store(tmp_path / "b2.zarr").meta.mpp_source == "override"
