"""Slide reading and magnification resolution on real public slides and TIFFs made here."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import shared_slide, tissue_image, write_tiff

from pipeline.errors import SlideError
from pipeline.slides import fingerprint, open_slide, resolve_mpp


def test_svs_metadata_and_read(cmu):
    with open_slide(cmu) as s:
        assert s.info.backend == "openslide" and s.info.vendor == "aperio"
        assert s.info.mpp == pytest.approx(0.499) and s.info.mpp_source == "openslide"
        assert (s.info.width, s.info.height) == (2220, 2967)
        tile = s.read(512, 512, 256, 1.0)
        assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
        assert tile.std() > 10  # real tissue, not a blank


def test_read_resizes_from_level0_with_area(cmu):
    """A 10x tile equals an area-downsample of the 20x pixels under it."""
    import cv2

    with open_slide(cmu) as s:
        big = s.read_rect(400, 400, 512, 512, s.info.mpp)
        small = s.read(400, 400, 256, 2 * s.info.mpp)
    ref = cv2.resize(big, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - ref.astype(int)).mean() < 1.0


def test_outside_scan_is_white(cmu):
    with open_slide(cmu) as s:
        tile = s.read(s.info.width - 100, s.info.height - 100, 256, s.info.mpp)
    assert (tile[150:, 150:] == 255).all()


def test_pyramid_level_choice(tmp_path):
    path = write_tiff(tmp_path / "pyr.tif", tissue_image(1024, 1536), mpp=0.5, levels=3)
    with open_slide(path) as s:
        assert s.info.level_downsamples == [1.0, 2.0, 4.0]
        assert s.best_level(1.0) == 0 and s.best_level(2.0) == 1 and s.best_level(3.9) == 1
        assert s.best_level(8.0) == 2
        assert s.read(0, 0, 128, 2.0).shape == (128, 128, 3)


def test_boxes_72dpi_tag_is_refused_unless_overridden():
    path = shared_slide("boxes.tiff")
    with pytest.raises(SlideError, match=r"boxes.tiff: .*352.8 µm/px.*mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as s:
        assert s.info.mpp == 0.25 and s.info.mpp_source == "override"


def test_stripped_tiff_falls_back_to_tifffile(tmp_path):
    img = tissue_image(700, 900)
    path = write_tiff(tmp_path / "strip.tif", img, mpp=0.5, tiled=False)
    with open_slide(path) as s:
        assert s.info.backend == "tifffile" and s.info.mpp == pytest.approx(0.5)
        assert s.info.mpp_source == "tiff-resolution"
        np.testing.assert_array_equal(s.read(100, 50, 64, 0.5), img[50:114, 100:164])
        edge = s.read(880, 680, 64, 0.5)  # runs past the image: white
        assert (edge[30:, 30:] == 255).all()


def test_inch_resolution_unit(tmp_path):
    path = tmp_path / "inch.tif"
    tifffile.imwrite(path, tissue_image(300, 300), photometric="rgb", rowsperstrip=16,
                     resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    with open_slide(path) as s:
        assert s.info.mpp == pytest.approx(0.25)


def test_no_mpp_source_names_the_fix(tmp_path):
    path = write_tiff(tmp_path / "nompp.tif", tissue_image(300, 300), mpp=None, tiled=False)
    with pytest.raises(SlideError, match=r"nompp.tif: magnification unknown.*'mpp' column"):
        open_slide(path)


@pytest.mark.parametrize("dtype,shape,photometric", [
    (np.uint16, (300, 300, 3), "rgb"),
    (np.uint8, (4, 300, 300), "minisblack"),
])
def test_non_brightfield_refused(tmp_path, dtype, shape, photometric):
    path = tmp_path / "fluo.tif"
    tifffile.imwrite(path, np.zeros(shape, dtype), photometric=photometric, tile=(64, 64),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with pytest.raises(SlideError, match="not a brightfield RGB image"):
        open_slide(path)


def test_dicom_reads_with_its_own_mpp():
    path = shared_slide("dicom-camelyon/multiframe_camelyon_challenge_image.dcm")
    with open_slide(path) as s:
        assert s.info.vendor == "dicom" and s.info.mpp == pytest.approx(28.97, abs=0.01)
        assert s.read(0, 0, 64, 60.0).shape == (64, 64, 3)


@pytest.mark.parametrize("name,cause", [
    ("broken/broken.svs", r"no reader can open it \(tifffile: TiffFileError: .*; dicom, openslide: not their format\)"),
    ("broken/unopenable.tiff", r"no reader can open it \(openslide: Unsupported TIFF compression: 52479; tifffile: "),
])
def test_broken_files_fail_on_open(name, cause):
    with pytest.raises(SlideError, match=cause) as e:
        open_slide(shared_slide(name))
    assert "\n" not in str(e.value) and str(e.value).startswith(name.split("/")[-1])


def test_unreadable_fails_on_read_naming_tile():
    with open_slide(shared_slide("broken/unreadable.svs")) as s:
        with pytest.raises(SlideError, match=r"unreadable.svs: cannot read tile at level-0 \(0, 0\).*Bogus"):
            s.read(0, 0, 16, s.info.mpp)


def test_missing_file():
    with pytest.raises(SlideError, match="file not found"):
        open_slide("/nonexistent/slide.svs")


def test_resolve_mpp_order():
    assert resolve_mpp("s", None, [("openslide", 0.25), ("objective-power", 0.5)]) == (0.25, "openslide")
    assert resolve_mpp("s", None, [("tiff-resolution", 352.8), ("objective-power", 0.5)]) == (0.5, "objective-power")
    assert resolve_mpp("s", 0.3, [("openslide", 0.25)]) == (0.3, "override")
    with pytest.raises(SlideError, match="positive"):
        resolve_mpp("s", -1.0, [])


def test_fingerprint_changes_with_content(tmp_path):
    a = write_tiff(tmp_path / "a.tif", tissue_image(200, 200, seed=1), tiled=False)
    f1 = fingerprint(a)
    write_tiff(a, tissue_image(200, 200, seed=2), tiled=False)
    assert fingerprint(a) != f1 and len(f1) == 64


def test_dicom_folder_with_several_series_is_refused(tmp_path):
    """OpenSlide opens the series of the file it is given; a folder must hold only one series."""
    import shutil

    pydicom = pytest.importorskip("pydicom")
    src = shared_slide("dicom-camelyon/multiframe_camelyon_challenge_image.dcm")
    folder = tmp_path / "two_series"
    folder.mkdir()
    shutil.copy(src, folder / "a.dcm")
    d = pydicom.dcmread(folder / "a.dcm")
    d.SeriesInstanceUID = "1.2.3.4.5"
    d.SOPInstanceUID = "1.2.3.4.5.1"
    d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
    d.save_as(folder / "b.dcm")
    with pytest.raises(SlideError, match=r"two_series: folder holds 2 DICOM series.*one file"):
        open_slide(folder)
    with open_slide(folder / "b.dcm") as s:  # a file picks its series
        assert s.info.vendor == "dicom"
    with open_slide(src.parent) as s:  # a folder with one series is fine
        assert s.info.width == 1152


def test_jpeg2000_tiff_read_by_tifffile(tmp_path):
    """JPEG 2000 tiles OpenSlide's generic reader refuses are decoded by tifffile (imagecodecs)."""
    img = tissue_image(512, 512)
    path = tmp_path / "j2k.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(256, 256), compression="jpeg2000",
                     compressionargs={"level": 95}, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.info.backend == "tifffile" and s.info.mpp == pytest.approx(0.5)
        tile = s.read(128, 128, 128, 0.5)
    assert np.abs(tile.astype(int) - img[128:256, 128:256].astype(int)).mean() < 6


def test_huge_single_level_slide_is_read_in_bounded_blocks(tmp_path, monkeypatch):
    """No whole-level read: every read while masking stays under max_read_pixels."""
    from pipeline.config import TilingConfig
    from pipeline.slides.tiff_reader import TiffSlide
    from pipeline.tiling.grid import tile_slide

    path = write_tiff(tmp_path / "big.tif", tissue_image(3000, 4000), mpp=0.25, tiled=False)
    sizes = []
    real = TiffSlide._read_level

    def spy(self, level, x, y, w, h):
        sizes.append(w * h)
        return real(self, level, x, y, w, h)

    monkeypatch.setattr(TiffSlide, "_read_level", spy)
    cap = 300_000
    with open_slide(path) as s:
        res = tile_slide(s, TilingConfig(max_read_pixels=cap))
    assert len(sizes) > 10 and max(sizes) <= cap * 1.05
    assert len(res.tiles["20x"]) > 0


def test_dicom_found_by_content_not_extension(tmp_path):
    """A folder of `.dicom` files (as Google's wsi-to-dicom-converter names them), or of files with
    no extension, opens; a file is DICOM by its "DICM" marker, whatever its name."""
    import shutil

    from pipeline.slides import READERS
    from pipeline.slides.dicom import is_dicom

    src = shared_slide("dicom-camelyon/multiframe_camelyon_challenge_image.dcm")
    for name in ("level-0.dicom", "level-0"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        shutil.copy(src, folder / name)
        (folder / "notes.txt").write_text("not a slide")  # a stray file next to the series is ignored
        assert is_dicom(folder / name) and not is_dicom(folder / "notes.txt")
        with open_slide(folder) as s:
            assert s.info.vendor == "dicom" and s.info.width == 1152 and s.info.path == str(folder)
            assert s.read(0, 0, 64, 60.0).std() > 0
    fake = tmp_path / "fake.dcm"  # the extension alone makes nothing DICOM
    fake.write_bytes(b"\0" * 200)
    assert not is_dicom(fake) and not is_dicom(tmp_path)
    empty = tmp_path / "no_dicom"
    empty.mkdir()
    (empty / "a.dcm").write_bytes(b"\0" * 128 + b"DIC")  # a truncated marker
    with pytest.raises(SlideError, match="no_dicom: folder holds no DICOM whole-slide image"):
        open_slide(empty)
    assert list(READERS) == ["dicom", "openslide", "tifffile"]  # the documented order
