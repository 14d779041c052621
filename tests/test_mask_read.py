"""How tiling reads a slide for its mask: one pyramid level, once, and what that read gives."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from conftest import tissue_image, write_tiff

from pipeline.config import TilingConfig
from pipeline.slides import SlideInfo, open_slide
from pipeline.slides.base import composite_white
from pipeline.tiling import grid as tiling
from pipeline.tiling.grid import MASK_FINEST_MPP, make_grid, mask_resolution, tile_grid, tile_slide
from pipeline.tiling.qc import tile_outlines
from pipeline.tiling.tissue import saturation, tissue_mask_from_saturation


def info(mpp: float, downsamples: list[float], size: tuple[int, int] = (100_000, 80_000)) -> SlideInfo:
    w, h = size
    return SlideInfo(path="x.tif", backend="openslide", vendor="generic-tiff", width=w, height=h, mpp=mpp,
                     mpp_source="openslide", level_downsamples=downsamples,
                     level_dimensions=[(math.ceil(w / d), math.ceil(h / d)) for d in downsamples])


@pytest.mark.parametrize(
    ("mpp", "downsamples", "size", "cfg", "want"),
    [
        (0.25, [1, 4, 16, 64, 256], None, {}, 16.0),  # 40x scan: the ds-64 level is exactly 16 µm/px
        (0.5, [1, 4, 16, 64, 256], None, {}, 8.0),  # 20x scan: ds 64 is 32 µm/px, coarser than mask_mpp
        (0.5, [1, 4, 16, 64, 256], None, {"mask_mpp": 32.0}, 32.0),
        (0.5, [1.0, 3.999, 15.97, 63.99], None, {}, 8.0),  # OpenSlide's ratios of rounded-up sizes: nominal 16
        (0.5, [1.0], (2220, 2967), {}, MASK_FINEST_MPP),  # single level: reduced to the finest mask resolution
        (30.0, [1.0], (1152, 700), {}, 30.0),  # scan coarser than mask_mpp: its own resolution, never upsampled
        (0.25, [1, 4], (400_000, 300_000), {}, 0.25 * 400_000 / 8192),  # shallow pyramid: capped by mask_max_side
    ],
)
def test_mask_resolution_is_one_pyramid_level(mpp, downsamples, size, cfg, want):
    got = mask_resolution(info(mpp, [float(d) for d in downsamples], size or (100_000, 80_000)), TilingConfig(**cfg))
    assert got == pytest.approx(want)


def test_tile_slide_reads_one_level_once(tmp_path, monkeypatch):
    """The mask and the QC picture come from a single read of one level: no pixel decoded twice."""
    path = write_tiff(tmp_path / "pyr.tif", tissue_image(4096, 3072, seed=3, blobs=5), mpp=0.5, levels=4)
    reads = []
    with open_slide(path) as s:
        real = type(s)._read_level

        def spy(self, level, x, y, w, h):
            reads.append((level, w * h))
            return real(self, level, x, y, w, h)

        monkeypatch.setattr(type(s), "_read_level", spy)
        res = tile_slide(s, TilingConfig(max_read_pixels=65_536))  # 256-px blocks of a 512 x 384 level
        level = s.info.level_downsamples.index(8.0)  # 4 µm/px: the coarsest level not above 16 µm/px
        lw, lh = s.info.level_dimensions[level]
    assert res.mask_mpp == pytest.approx(4.0) and res.mask.shape == (lh, lw)
    assert {lv for lv, _ in reads} == {level} and len(reads) > 1  # several blocks, one level
    assert sum(n for _, n in reads) == lw * lh  # every level pixel read exactly once
    assert res.thumbnail.shape == (lh, lw, 3) and res.thumb_mpp == res.mask_mpp  # small: the QC picture is the read
    assert len(res.tiles["20x"]) > 0


def test_qc_picture_is_the_read_reduced_without_seams(tmp_path, monkeypatch):
    """Above QC_SIDE the QC picture is the mask-resolution read area-reduced by an integer k, block by block."""
    img = tissue_image(1280, 1920, seed=5, blobs=6)
    path = write_tiff(tmp_path / "flat.tif", img, mpp=0.5, tiled=False)  # masked at 1 µm/px: 960 x 640
    monkeypatch.setattr(tiling, "QC_SIDE", 100)
    with open_slide(path) as s:
        res = tile_slide(s, TilingConfig(max_read_pixels=65_536))  # 256-px blocks -> 250 (a multiple of k)
        full = s.thumbnail(res.mask_mpp)
    k = 10  # ceil(960 / 100)
    assert res.mask_mpp == 1.0 and res.thumb_mpp == 10.0 and res.thumbnail.shape == (64, 96, 3)
    np.testing.assert_array_equal(res.thumbnail, cv2.resize(full, (96, 64), interpolation=cv2.INTER_AREA))
    mask = tissue_mask_from_saturation(saturation(full), 1.0)
    np.testing.assert_array_equal(res.mask, mask)
    assert full.shape[1] // k == 96


@pytest.mark.parametrize("align", [1, 3, 8])
def test_thumbnail_blocks_tile_the_thumbnail(tmp_path, align):
    path = write_tiff(tmp_path / "b.tif", tissue_image(700, 500, seed=1), mpp=0.5, levels=2)
    with open_slide(path) as s:
        h, w = s.thumbnail_shape(1.3)
        cover = np.zeros((h, w), int)
        out = np.zeros((h, w, 3), np.uint8)
        for y, x, blk in s.thumbnail_blocks(1.3, max_read_pixels=20_000, align=align):
            bh, bw = blk.shape[:2]
            assert (bh % align == 0 or y + bh == h) and (bw % align == 0 or x + bw == w)
            cover[y : y + bh, x : x + bw] += 1
            out[y : y + bh, x : x + bw] = blk
        want = s.thumbnail(1.3, max_read_pixels=20_000)
    assert (cover == 1).all()
    # other block edges resample the level slightly differently (1.3 µm/px is no level's)
    diff = np.abs(out.astype(int) - want)
    assert diff.max() == 0 if align == 1 else diff.mean() < 1


def test_mask_cleanup_is_physical_across_resolutions(tmp_path):
    """Four close tissue pieces, each under min_component_um2: joined (kept) at 1 and at 8 µm/px alike."""
    path = write_tiff(tmp_path / "v.tif", tissue_image(896, 768, seed=10, blobs=4), mpp=0.5, tiled=False)
    fractions = []
    with open_slide(path) as s:
        for mpp in (1.0, 8.0):
            mask = tissue_mask_from_saturation(saturation(s.thumbnail(mpp)), mpp)
            fractions.append(mask.mean())
    assert min(fractions) > 0.3 and abs(fractions[0] - fractions[1]) < 0.02, fractions


def test_tiles_agree_across_mask_resolutions(tmp_path):
    """The same tissue masked at 1 and at 8 µm/px keeps nearly the same tiles (the mask is area-exact)."""
    path = write_tiff(tmp_path / "t.tif", tissue_image(2000, 1600, seed=7, blobs=5), mpp=0.5, tiled=False)
    cfg = TilingConfig(tile_size=64)
    with open_slide(path) as s:
        grid = make_grid(s.info.width, s.info.height, s.info.mpp, cfg)
        kept = []
        for mpp in (1.0, 8.0):
            mask = tissue_mask_from_saturation(saturation(s.thumbnail(mpp)), mpp)
            kept.append({tuple(c) for c in tile_grid(mask, mpp / s.info.mpp, grid, cfg)["20x"].coords})
    assert len(kept[0] & kept[1]) / len(kept[0] | kept[1]) > 0.9


def testcomposite_white():
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[0, :, 3] = 255  # opaque row: the colour as is
    rgba[1, 0, 3] = 0  # transparent: white
    rgba[1, 1, 3] = 128  # half: halfway to white
    rgba[1, 2, 3] = 255
    rgb = composite_white(rgba)
    assert rgb.shape == (2, 3, 3) and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb[0], [[10, 200, 30]] * 3)
    np.testing.assert_array_equal(rgb[1, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[1, 1], np.round(np.array([10, 200, 30]) * 128 / 255 + 255 * 127 / 255).astype(int))
    np.testing.assert_array_equal(rgb[1, 2], [10, 200, 30])


@pytest.mark.parametrize("width", [1, 2])
def test_tile_outlines_draw_what_rectangles_draw(width):
    rng = np.random.default_rng(width)
    coords = rng.integers(0, 5000, (300, 2))
    scale, side = 0.23, 512 * 0.23
    a = np.zeros((1200, 1200, 3), np.uint8)
    for x, y in coords:
        cv2.rectangle(a, (int(round(x * scale)), int(round(y * scale))),
                      (int(round(x * scale + side)) - 1, int(round(y * scale + side)) - 1), (30, 110, 255), width)
    b = np.zeros_like(a)
    cv2.polylines(b, tile_outlines(coords, scale, side), True, (30, 110, 255), width)
    np.testing.assert_array_equal(a, b)
    assert tile_outlines(np.zeros((0, 2), np.int64), scale, side) == []
