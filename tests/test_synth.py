"""Synthetic slides: the pyramidal TIFF writer, the demo cohort and the benchmark mosaic."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
from conftest import REPO, shared_slide

from pipeline.synthetic.demo import MPP, make_demo_cohort
from pipeline.synthetic.he_painting import E_VEC, H_VEC
from pipeline.synthetic.slides import level_shapes, write_pyramid_tiff


def _smooth_image(h: int, w: int) -> np.ndarray:
    """A smooth colourful test image (JPEG keeps it within a few grey levels)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 97), 128 + 100 * np.cos(yy / 61), 128 + 80 * np.sin((xx + yy) / 151)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _read(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))


def test_level_shapes_auto_and_fixed():
    assert level_shapes((80_000, 100_000)) == [(80000, 100000), (20000, 25000), (5000, 6250), (1250, 1563), (313, 391)]
    assert len(level_shapes((500, 600))) == 3  # at least 3 levels even on tiny images
    assert level_shapes((1000, 1500), n_levels=2, downsample=2) == [(1000, 1500), (500, 750)]


def test_pyramid_roundtrip_with_openslide(tmp_path):
    h, w, mpp = 1100, 1500, 0.25
    img = _smooth_image(h, w)
    shapes = level_shapes((h, w), 3, 4)
    levels = [img] + [cv2.resize(img, (s[1], s[0]), interpolation=cv2.INTER_AREA) for s in shapes[1:]]
    calls = []

    def tile_fn(level, y, x, th, tw):
        calls.append((level, y, x, th, tw))
        return levels[level][y : y + th, x : x + tw]

    out = tmp_path / "pyr.tiff"
    assert write_pyramid_tiff(out, (h, w), tile_fn, mpp=mpp, n_levels=3) == shapes
    assert [p.name for p in tmp_path.iterdir()] == ["pyr.tiff"]  # no temporary file left beside it
    assert all(th <= 256 and tw <= 256 for *_, th, tw in calls)  # streamed tile by tile
    with openslide.OpenSlide(str(out)) as s:
        assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert s.level_count == 3
        assert s.level_dimensions == tuple((sw, sh) for sh, sw in shapes)
        assert math.isclose(float(s.properties[openslide.PROPERTY_NAME_MPP_X]), mpp, rel_tol=1e-6)
        assert math.isclose(float(s.properties[openslide.PROPERTY_NAME_MPP_Y]), mpp, rel_tol=1e-6)
        for level in (0, 1):
            err = np.abs(_read(s, level).astype(int) - levels[level].astype(int))
            assert err.mean() < 2.5 and np.percentile(err, 99) < 12, (level, err.mean())


def test_pyramid_is_atomic_on_error(tmp_path):
    out = tmp_path / "bad.tiff"

    def bad_tile_fn(level, y, x, th, tw):
        if level == 1:
            raise RuntimeError("boom")
        return np.zeros((th, tw, 3), np.uint8)

    with pytest.raises(RuntimeError, match="boom"):
        write_pyramid_tiff(out, (600, 700), bad_tile_fn, mpp=0.5)
    with pytest.raises(ValueError, match="expected"):
        write_pyramid_tiff(out, (600, 700), lambda *a: np.zeros((5, 5, 3), np.uint8), mpp=0.5)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """The same small cohort twice (seed 0) and once with another seed."""
    base = tmp_path_factory.mktemp("demo")
    return {
        name: make_demo_cohort(base / name, n_slides=4, seed=seed, scale=0.3)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    }


def _rows(sheet: Path) -> list[dict]:
    with open(sheet, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_demo_sheet_and_slides_are_valid(cohorts):
    sheet = cohorts["a"]
    assert sheet.name == "slides.tsv"
    rows = _rows(sheet)
    assert list(rows[0]) == ["slide_id", "path", "label", "patient_id"]
    assert len(rows) == 4 and {r["label"] for r in rows} == {"normal", "tumor"}
    assert len({r["slide_id"] for r in rows}) == 4
    for r in rows:
        assert not os.path.isabs(r["path"])  # relative to the sheet's folder
        with openslide.OpenSlide(str(sheet.parent / r["path"])) as s:
            assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
            assert s.level_count >= 3
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
            assert min(s.dimensions) >= 1024


def test_demo_is_deterministic_per_seed(cohorts):
    def files(sheet):
        return [(sheet.parent / r["path"]).read_bytes() for r in _rows(sheet)]

    a, b, c = (files(cohorts[k]) for k in "abc")
    assert a == b
    assert cohorts["a"].read_bytes() == cohorts["b"].read_bytes()
    assert all(x != y for x, y in zip(a, c, strict=True))


def _nuclear_fraction(rgb: np.ndarray, where: np.ndarray) -> float:
    """Fraction of `where` pixels dominated by haematoxylin (colour deconvolution into H and E)."""
    rgb, where = rgb[::2, ::2], where[::2, ::2]  # every 4th pixel is plenty, and 4x faster
    od = -np.log((rgb.astype(np.float32) + 1) / 256).reshape(-1, 3)
    stains = np.stack([H_VEC / np.linalg.norm(H_VEC), E_VEC / np.linalg.norm(E_VEC)], 1)
    conc = od @ np.linalg.pinv(stains).T
    return float((conc[:, 0].reshape(rgb.shape[:2]) > 0.5)[where].mean())


def test_lesions_show_more_nuclear_stain_than_normal_tissue(cohorts):
    sheet = cohorts["a"]
    lesions = json.loads((sheet.parent / "lesions.json").read_text())["lesions"]
    in_lesion, normal = [], []
    for r in _rows(sheet):
        with openslide.OpenSlide(str(sheet.parent / r["path"])) as s:
            rgb = _read(s, 0)
        tissue = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 25
        if r["label"] == "tumor":
            assert lesions[r["slide_id"]], "a tumor slide without lesion"
            m = np.zeros(rgb.shape[:2], np.uint8)
            cv2.fillPoly(m, [np.array(c, np.int32) for c in lesions[r["slide_id"]]], 1)
            in_lesion.append(_nuclear_fraction(rgb, (m > 0) & tissue))
        else:
            assert lesions[r["slide_id"]] == []
            normal.append(_nuclear_fraction(rgb, tissue))
    assert min(in_lesion) > 3 * max(normal), (in_lesion, normal)


def test_mosaic_bench_slide(tmp_path):
    source = shared_slide("CMU-1-Small-Region.svs")
    spec = importlib.util.spec_from_file_location("make_slide", REPO / "bench" / "make_slide.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "mosaic.tiff"
    info = mod.make_mosaic_slide(out, width=5000, height=4000, source=source)
    with openslide.OpenSlide(str(out)) as s:
        assert s.dimensions == (5000, 4000) and s.level_count >= 3
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(info["mpp"])
        low = _read(s, 2)
    sat = cv2.cvtColor(low, cv2.COLOR_RGB2HSV)[..., 1] > 25
    assert 0.05 < sat.mean() < 0.9  # a tissue / background mix
