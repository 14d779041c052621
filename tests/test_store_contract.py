"""The typed store contract: metadata round trips through the stores' flat attributes, readers
refuse stores that lack what they need, and array specs describe what writers write."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import SlideError
from pipeline.store import (FEATURE_ARRAYS, TILE_ARRAYS, FeatureStoreMeta, FeatureStoreWriter, TileSet, TileStoreMeta,
                            list_arrays, read_attrs, read_feature_store, read_tile_store, write_tile_store)


def tiles(n: int = 3) -> dict[str, TileSet]:
    xy = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
    return {"20x": TileSet(coords=xy, grid=(xy // 64)[:, ::-1].astype(np.int32), tissue=np.full(n, 0.5, np.float32),
                           region=np.zeros(n, np.int32), parent=np.full(n, -1, np.int64))}


def test_tile_meta_round_trip_and_writer_fields(tmp_path):
    meta = TileStoreMeta(slide_id="s", slide_path="/x/s.svs", base_mpp=0.25, level0_size=(640, 480),
                         tile_px_level0={"20x": 64.0}, region_grid=(1, 3), tiling={"tile_size": 32})
    write_tile_store(tmp_path / "s.zarr", tiles(), meta)
    attrs = read_attrs(tmp_path / "s.zarr")
    assert attrs["kind"] == "tiles" and attrs["status"] == "ok" and attrs["level0_size"] == [640, 480]  # flat JSON
    got = read_tile_store(tmp_path / "s.zarr").meta
    assert got.magnifications == ("20x",) and got.n_tiles == {"20x": 3} and len(got.tiles_sha256) == 64
    assert got == meta.with_tiles(tiles())  # every field survives the trip


def test_feature_meta_keeps_encoder_provenance_flat(tmp_path):
    meta = FeatureStoreMeta(slide_id="s", encoder="uni", tiles_sha256="t", extra={"weights_sha256": "ab", "out_dim": 4})
    w = FeatureStoreWriter(tmp_path / "f.zarr", tiles(), {"20x": 4}, meta)
    w.write("20x", 0, np.ones((3, 4), np.float16), np.zeros(3, bool))
    w.finalize()
    attrs = json.loads((tmp_path / "f.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["weights_sha256"] == "ab" and attrs["encoder"] == "uni" and "extra" not in attrs
    got, sets = read_feature_store(tmp_path / "f.zarr")
    assert got.get("weights_sha256") == "ab" and got.dims == {"20x": 4} and got.magnifications == ("20x",)
    arrays = list_arrays(tmp_path / "f.zarr")
    for key, spec in FEATURE_ARRAYS.items():  # the specs describe what the writer wrote
        info = arrays[f"20x/{key}"]
        assert info.dtype == np.dtype(spec.dtype) and spec.fits(info.shape), key


def test_a_store_without_its_slide_id_is_refused_by_name(tmp_path):
    write_tile_store(tmp_path / "s.zarr", tiles(), TileStoreMeta(slide_id="s"))
    doc = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    del doc["attributes"]["slide_id"]
    (tmp_path / "s.zarr" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(SlideError, match=r"^s: tiles store .*s\.zarr lacks slide_id"):
        read_tile_store(tmp_path / "s.zarr")


def test_array_specs():
    assert TILE_ARRAYS["coords"].fits((5, 2)) and not TILE_ARRAYS["coords"].fits((5, 3))
    assert not TILE_ARRAYS["tissue"].fits((5, 1)) and FEATURE_ARRAYS["features"].fits((5, 768))
    assert FEATURE_ARRAYS["features"].shape_text() == "(N, D)" and TILE_ARRAYS["region"].shape_text() == "(N,)"
