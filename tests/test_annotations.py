"""QuPath exchange: GeoJSON export (schema, round trip), GeoJSON / ASAP XML import, repair and
clipping, include / exclude regions in tiling, lesion geometry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
import shapely
import yaml
from conftest import REPO, tissue_image, write_tiff
from shapely.geometry import Polygon, box

from pipeline.cli import main
from pipeline.report.geojson import export_slide, mask_polygons, slide_attention, tissue_geometry
from pipeline.slides.annotations import (
    AnnotationError,
    lesion_geometries,
    lesion_geometry,
    rasterize,
    read_annotations,
)
from pipeline.store import (
    TileSet,
    TileStoreMeta,
    read_attrs,
    read_tile_store,
    store_state,
    write_tile_store,
)

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "qupath_geojson.schema.yaml").read_text())


def _mask() -> np.ndarray:
    """A blob with a hole, an island inside the hole, and a second piece (mask px)."""
    m = np.zeros((60, 80), np.uint8)
    cv2.circle(m, (25, 30), 20, 1, -1)
    cv2.circle(m, (25, 30), 9, 0, -1)
    cv2.circle(m, (25, 30), 3, 1, -1)
    cv2.rectangle(m, (55, 10), (75, 50), 1, -1)
    return m


def _tile_store(path: Path, slide_id="s1") -> dict[str, TileSet]:
    tiles = {}
    for mag, side in (("20x", 64), ("10x", 128)):
        xy = np.array([[0, 0], [side, 0], [side, side]], np.int64)
        tiles[mag] = TileSet(coords=xy, grid=(xy // side)[:, ::-1].astype(np.int32),
                             tissue=np.array([0.5, 0.75, 1.0], np.float32), region=np.zeros(3, np.int32),
                             parent=np.full(3, -1, np.int64))
    write_tile_store(path, tiles, TileStoreMeta(slide_id=slide_id, mask_mpp=8.0, base_mpp=0.5,
                                                tile_px_level0={"20x": 64.0, "10x": 128.0}, level0_size=(1280, 960)))
    return tiles


def test_export_matches_qupath_schema_and_round_trips(tmp_path):
    mask = _mask()
    cv2.imwrite(str(tmp_path / "m.png"), mask * 255)
    tiles = _tile_store(tmp_path / "t.zarr")
    att = {"20x": (np.array([0.1, 0.7, 0.2], np.float32), np.array([[64, 64], [64, 0], [0, 0]])),  # other order
           "10x": (np.array([0.9, 0.1], np.float32), np.array([[0, 0], [128, 0]]))}  # one tile failed
    n = export_slide(tmp_path / "t.zarr", tmp_path / "s1.geojson", tmp_path / "m.png", {"abmil_3": att}, "abmil_3")
    doc = json.loads((tmp_path / "s1.geojson").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert n == len(doc["features"]) == 3 + 3 + 3  # three tissue pieces (blob, island, rectangle), 3 + 3 tiles
    # tissue: import gives back the exported polygons, holes included
    want = shapely.unary_union(mask_polygons(mask, 16.0))
    got = read_annotations(tmp_path / "s1.geojson")
    assert list(got) == ["Tissue"] and got["Tissue"].symmetric_difference(want).area < 1e-3 * want.area
    assert got["Tissue"].equals(tissue_geometry(doc["features"]))
    assert not got["Tissue"].contains(shapely.Point(25 * 16 + 8 + 6 * 16, 30 * 16 + 8))  # in the hole
    assert got["Tissue"].contains(shapely.Point(25 * 16 + 8, 30 * 16 + 8))  # on the island
    # rasterised back at mask resolution: the mask, up to its outline pixels
    back = rasterize(got["Tissue"], mask.shape, 16.0)
    assert (back & mask).sum() / (back | mask).sum() > 0.9
    # tiles: one object per kept tile, class per magnification, tissue and attention as measurements
    t = read_annotations(tmp_path / "s1.geojson", object_types=("tile",))
    assert set(t) == {"Tile 20x", "Tile 10x"}
    assert t["Tile 20x"].equals(shapely.unary_union([box(x, y, x + 64, y + 64) for x, y in tiles["20x"].coords]))
    by_name = {f["properties"]["name"]: f["properties"] for f in doc["features"]}
    assert by_name["20x #1"]["measurements"] == {"Tissue fraction": 0.75, "Attention abmil_3": pytest.approx(0.7),
                                                 "Attention rank abmil_3": 1.0}
    assert by_name["20x #0"]["measurements"]["Attention rank abmil_3"] == 0.5  # matched by coordinates
    assert by_name["20x #2"]["measurements"]["Attention abmil_3"] == pytest.approx(0.1)
    assert by_name["20x #2"]["color"] == [0, 0, 4] and by_name["20x #1"]["color"] == [252, 255, 164]  # inferno ends
    assert "Attention abmil_3" not in by_name["10x #2"]["measurements"] and "color" not in by_name["10x #2"]
    assert by_name["Tissue 1"]["classification"] == {"name": "Tissue", "color": [0, 200, 0]}
    areas = sorted(f["properties"]["measurements"]["Area µm^2"] for f in doc["features"] if f["properties"]["objectType"] == "annotation")
    assert areas == pytest.approx(sorted(p.area * 0.25 for p in mask_polygons(mask, 16.0)), rel=1e-3)  # 0.5 µm/px
    # a rerun writes the same bytes (deterministic ids)
    first = (tmp_path / "s1.geojson").read_bytes()
    export_slide(tmp_path / "t.zarr", tmp_path / "s1.geojson", tmp_path / "m.png", {"abmil_3": att}, "abmil_3")
    assert (tmp_path / "s1.geojson").read_bytes() == first


def test_slide_attention_from_npz(tmp_path):
    np.savez(tmp_path / "f0.npz", **{"a|20x|attention": np.ones(2), "a|20x|coords": np.zeros((2, 2))})
    np.savez(tmp_path / "f1.npz", **{"b|20x|attention": np.full(3, 2.0), "b|20x|coords": np.ones((3, 2)),
                                     "b|5x|attention": np.ones(1), "b|5x|coords": np.ones((1, 2))})
    got = slide_attention([tmp_path / "f0.npz", tmp_path / "f1.npz"], "b")
    assert set(got) == {"20x", "5x"} and got["20x"][0].tolist() == [2.0] * 3
    assert slide_attention([tmp_path / "f0.npz"], "b") == {}


CAMELYON_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="100" Y="100" />
        <Coordinate Order="2" X="1100" Y="1100" />
        <Coordinate Order="1" X="1100" Y="100" />
        <Coordinate Order="3" X="100" Y="1100" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Spline" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="2.0e+03" Y="200,5" />
        <Coordinate Order="1" X="2500" Y="200,5" />
        <Coordinate Order="2" X="2500" Y="700" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="400" Y="400" /><Coordinate Order="1" X="800" Y="400" />
        <Coordinate Order="2" X="800" Y="800" /><Coordinate Order="3" X="400" Y="800" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000" /></AnnotationGroups>
</ASAP_Annotations>
"""


def test_camelyon16_asap_xml_and_lesion_tiles(tmp_path, caplog):
    (tmp_path / "tumor_001.xml").write_text(CAMELYON_XML)
    with caplog.at_level(logging.WARNING, logger="pipeline.slides.annotations"):
        ann = read_annotations(tmp_path / "tumor_001.xml")
    assert sorted(ann) == ["_0", "_1", "_2"]
    # the shuffled Order attributes are followed: a square, not a bow-tie (which would need repair)
    assert ann["_0"].equals(box(100, 100, 1100, 1100)) and not caplog.records[1:]
    assert "1 annotation(s) without area (dots, point sets) ignored" in caplog.records[0].getMessage()
    assert ann["_1"].area == pytest.approx(0.5 * 500 * 499.5)
    lesion = lesion_geometry(ann, ["_0", "_1"], ["_2"])
    assert lesion.area == pytest.approx(1000**2 - 400**2 + ann["_1"].area)
    # tiles whose centre is in the lesion: the _2 hole is not lesion
    centres = {"in": (200, 200), "hole": (600, 600), "other": (2400, 300), "out": (1500, 1500)}
    inside = {k: lesion.contains(shapely.Point(p)) for k, p in centres.items()}
    assert inside == {"in": True, "hole": False, "other": True, "out": False}
    geoms = lesion_geometries({"tumor_001": tmp_path / "tumor_001.xml", "normal_001": None}, ["_0", "_1"], ["_2"])
    assert list(geoms) == ["tumor_001"] and geoms["tumor_001"].equals(lesion)


def test_qupath_formats_repair_and_clipping(tmp_path, caplog):
    old = [  # QuPath 0.2/0.3: a bare array of Features, colorRGB, measurements as a list
        {"type": "Feature", "id": "PathAnnotationObject",
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]},
         "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}, "isLocked": False,
                        "measurements": [{"name": "Area", "value": 1.0}]}},
        {"type": "Feature",  # a bow-tie: invalid, repaired
         "geometry": {"type": "Polygon", "coordinates": [[[200, 200], [300, 300], [300, 200], [200, 300], [200, 200]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Pen", "color": [0, 0, 0]}}},
        {"type": "Feature",  # reaches beyond the slide: clipped
         "geometry": {"type": "Polygon", "coordinates": [[[900, 900], [1100, 900], [1100, 1100], [900, 1100], [900, 900]]]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature",  # entirely outside: refused
         "geometry": {"type": "Polygon", "coordinates": [[[2000, 0], [2100, 0], [2100, 50], [2000, 0]]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
    ]
    (tmp_path / "a.json").write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="pipeline.slides.annotations"):
        ann = read_annotations(tmp_path / "a.json", slide_size=(1000, 1000))
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and all(m.startswith(f"{tmp_path / 'a.json'}: ") for m in msgs)
    assert "1 invalid polygon(s) repaired (make_valid), first: Pen (Self-intersection" in msgs[0]
    assert "1 polygon(s) reach beyond the slide (1000 x 1000 px) and were clipped to it, first: Unclassified" in msgs[1]
    assert "1 polygon(s) lie outside the slide (1000 x 1000 px) and were refused, first: Tumor at x 2000..2100" in msgs[2]
    assert ann["Tumor"].equals(box(0, 0, 100, 100))
    assert ann["Pen"].is_valid and ann["Pen"].area == pytest.approx(5000)
    assert ann["Unclassified"].equals(box(900, 900, 1000, 1000))


@pytest.mark.parametrize("content,msg", [
    ("slide_id\tpath\n", "neither GeoJSON nor ASAP XML"),
    ('{"annotations": []}', "JSON but not GeoJSON"),
    ("<Annotations><Annotation/></Annotations>", r"XML with root <Annotations>, not ASAP"),
    ('{"type": "FeatureCollection", "features": [', "broken JSON"),
])
def test_other_files_refused_with_one_line(tmp_path, content, msg):
    (tmp_path / "x.txt").write_text(content)
    with pytest.raises(AnnotationError, match=msg) as e:
        read_annotations(tmp_path / "x.txt")
    assert str(e.value).startswith(str(tmp_path / "x.txt")) and "\n" not in str(e.value)


def test_rasterize_holes_and_islands():
    """Pixel centres inside the geometry are set, up to the pixels the outline crosses (cv2 draws it)."""
    outer = box(3, 5, 161, 150).difference(box(41, 37, 117, 122))
    geom = shapely.unary_union([outer, box(66, 61, 95, 97), Polygon([(170, 10), (190, 180), (178, 185)])])
    r = rasterize(geom, (13, 13), 16.0)
    yy, xx = np.mgrid[0:13, 0:13]
    truth = shapely.contains_xy(geom, (xx + 0.5) * 16, (yy + 0.5) * 16)
    off = np.argwhere(r.astype(bool) != truth)
    dist = [geom.boundary.distance(shapely.Point((x + 0.5) * 16, (y + 0.5) * 16)) for y, x in off]
    assert all(d <= 16 for d in dist), dist
    assert r[5, 5] == 1 and r[3, 3] == 0 and r[1, 1] == 1 and r[12, 0] == 0  # island, hole, outer, outside


def test_tiling_excludes_annotated_regions(tmp_path, capsys):
    img = np.full((768, 1024, 3), 240, np.uint8)
    img[128:640, 128:896] = (190, 110, 170)  # one big block of "tissue"
    slide = write_tiff(tmp_path / "s.tif", img, mpp=0.5, levels=2)
    tiling = json.dumps({"tile_size": 64, "mask_mpp": 4.0, "min_component_um2": 0, "max_hole_um2": 0})
    assert main(["tile", str(slide), "--out", str(tmp_path / "all.zarr"), "--tiling", tiling]) == 0
    pen = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": [[[512, 0], [1024, 0], [1024, 768], [512, 768], [512, 0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Pen"}}}]}
    (tmp_path / "pen.geojson").write_text(json.dumps(pen))
    assert main(["tile", str(slide), "--out", str(tmp_path / "ex.zarr"), "--tiling", tiling,
                 "--annotations", str(tmp_path / "pen.geojson"), "--exclude", "Pen"]) == 0
    full, cut = read_tile_store(tmp_path / "all.zarr").tiles, read_tile_store(tmp_path / "ex.zarr").tiles
    for mag in full:
        right = full[mag].coords[:, 0] + read_attrs(tmp_path / "all.zarr")["tile_px_level0"][mag] / 2 >= 512
        assert right.any() and (~right).any()
        assert (cut[mag].coords[:, 0] < 512).all()  # nothing kept on the pen side
        kept = {tuple(c) for c in cut[mag].coords.tolist()}
        assert kept <= {tuple(c) for c in full[mag].coords.tolist()}
        assert len(kept) >= (~right).sum() - 2 * (len(full[mag]) ** 0.5)  # the left part stays (border tiles may go)
    assert read_attrs(tmp_path / "ex.zarr")["annotations"]["exclude"] == ["Pen"]
    # only inside an included class: here the same region, so only the right part is tiled
    assert main(["tile", str(slide), "--out", str(tmp_path / "in.zarr"), "--tiling", tiling,
                 "--annotations", str(tmp_path / "pen.geojson"), "--include", "Pen"]) == 0
    assert (read_tile_store(tmp_path / "in.zarr").tiles["20x"].coords[:, 0] >= 480).all()
    # a file that is neither format: the slide fails with one line naming the file
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    capsys.readouterr()
    assert main(["tile", str(slide), "--out", str(tmp_path / "bad.zarr"), "--tiling", tiling, "--slide-id", "s",
                 "--annotations", str(tmp_path / "bad.csv"), "--exclude", "Pen", "--record-failure"]) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"error: s: {tmp_path / 'bad.csv'}: neither GeoJSON nor ASAP XML"
    assert store_state(tmp_path / "bad.zarr")[0] == "failed"


def test_export_cli_on_a_real_tiling(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(600, 800, seed=2, blobs=3), mpp=0.5, levels=2)
    tiling = json.dumps({"tile_size": 64, "mask_mpp": 4.0, "min_component_um2": 0, "max_hole_um2": 0})
    assert main(["tile", str(slide), "--out", str(tmp_path / "s.zarr"), "--tiling", tiling,
                 "--mask", str(tmp_path / "s.mask.png")]) == 0
    assert main(["export-qupath", str(tmp_path / "s.zarr"), "--mask", str(tmp_path / "s.mask.png"),
                 "--out", str(tmp_path / "s.geojson")]) == 0
    doc = json.loads((tmp_path / "s.geojson").read_text())
    jsonschema.validate(doc, SCHEMA)
    tissue = read_annotations(tmp_path / "s.geojson", slide_size=(800, 600))["Tissue"]
    ts = read_tile_store(tmp_path / "s.zarr")
    side = ts.meta.tile_px_level0["20x"]
    # each kept tile's share of the exported tissue is its recorded tissue fraction (outlines run
    # through the centres of the mask's edge pixels: half a mask pixel = 4 of the tile's 64 px)
    share = np.array([tissue.intersection(box(x, y, x + side, y + side)).area / side**2 for x, y in ts.tiles["20x"].coords])
    assert len(share) > 10 and np.abs(share - ts.tiles["20x"].tissue).mean() < 0.1
