"""The lean Zarr reader returns exactly what zarr-python returns, and hands other arrays to it."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.store import zarr_io


def _write(path, data, **kw):
    arr = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, **kw)
    if data.size:
        arr[...] = data
    return arr


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 300),
    d=st.sampled_from([(), (1,), (2,), (7,)]),
    rows=st.integers(1, 64),
    dtype=st.sampled_from(["float16", "float32", "int32", "int64", "bool", "uint8"]),
    codec=st.sampled_from(["none", "zstd", "blosc-lz4-bitshuffle", "blosc-zstd-shuffle", "crc32c", "zstd-crc32c",
                           "blosc-crc32c"]),
    holes=st.booleans(),
)
def test_lean_path_equals_zarr(tmp_path_factory, n, d, rows, dtype, codec, holes):
    """Random shapes, chunkings, dtypes and codecs, with never-written chunks."""
    path = tmp_path_factory.mktemp("z") / "a"
    rng = np.random.default_rng(n * 31 + rows)
    data = (rng.random((n, *d)) * 100).astype(dtype)
    if holes and n:
        data[: min(n, rows)] = 0  # an all-fill chunk is not written at all
    kw = {"chunks": (rows, *d), "compressors": {
        "none": None,
        "zstd": zarr.codecs.ZstdCodec(),
        "blosc-lz4-bitshuffle": zarr.codecs.BloscCodec(cname="lz4", shuffle="bitshuffle"),
        "blosc-zstd-shuffle": zarr.codecs.BloscCodec(cname="zstd", shuffle="shuffle"),
        "crc32c": zarr.codecs.Crc32cCodec(),
        "zstd-crc32c": [zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()],
        "blosc-crc32c": [zarr.codecs.BloscCodec(cname="lz4", shuffle="bitshuffle"), zarr.codecs.Crc32cCodec()],
    }[codec]}
    _write(path, data, fill_value=0, **kw)
    assert zarr_io._lean_plan(zarr_io.read_node_meta(path)) is not None  # the lean path is taken
    got = zarr_io.read_array(path)
    want = zarr.open_array(str(path), mode="r")[...]
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "kw",
    [
        {"chunks": (16, 3)},  # chunked along the second axis too
        {"chunks": (8, 6), "shards": (32, 6)},  # sharding codec
        {"chunks": (16, 6), "compressors": zarr.codecs.GzipCodec()},  # another compressor
        {"chunks": (16, 6), "fill_value": float("nan")},  # a fill value JSON writes as a string
    ],
    ids=["2d-chunks", "sharded", "gzip", "nan-fill"],
)
def test_other_arrays_fall_back_to_zarr(tmp_path, kw):
    data = np.random.default_rng(0).random((50, 6)).astype("float32")
    data[:16] = np.nan if "fill_value" in kw else data[:16]
    _write(tmp_path / "a", data, **kw)
    assert zarr_io._lean_plan(zarr_io.read_node_meta(tmp_path / "a")) is None
    np.testing.assert_array_equal(zarr_io.read_array(tmp_path / "a"), data)


def test_unreadable_metadata_raises(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(OSError):
        zarr_io.read_node_meta(tmp_path / "a")
    (tmp_path / "a" / "zarr.json").write_text('{"zarr_format": 2}')
    with pytest.raises(ValueError, match="not a Zarr v3 node"):
        zarr_io.read_node_meta(tmp_path / "a")


def test_feature_store_read_equals_zarr_python(tmp_path):
    """A store as extraction writes it (Blosc-LZ4 features, an uneven last chunk, a failed tile)."""
    from pipeline.store import FeatureStoreMeta, FeatureStoreWriter, TileSet, read_feature_store

    n, dim = 37, 8
    tiles = {"20x": TileSet(coords=np.arange(2 * n).reshape(n, 2), grid=np.zeros((n, 2), np.int32),
                            tissue=np.ones(n, np.float32), region=np.arange(n, dtype=np.int32) // 4,
                            parent=np.full(n, -1))}
    feats = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float16)
    failed = np.zeros(n, bool)
    failed[5] = True
    w = FeatureStoreWriter(tmp_path / "s.zarr", tiles, {"20x": dim}, FeatureStoreMeta(encoder="x", tiles_sha256="t"), chunk_rows=16)
    for start in range(0, n, 16):
        w.write("20x", start, feats[start : start + 16], failed[start : start + 16])
    w.finalize()
    meta = zarr_io.read_node_meta(tmp_path / "s.zarr" / "20x" / "features")
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "blosc", "crc32c"]
    _, sets = read_feature_store(tmp_path / "s.zarr")
    ref = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["20x"]
    for key in ("features", "coords", "region", "failed"):
        np.testing.assert_array_equal(getattr(sets["20x"], key), ref[key][...])
    np.testing.assert_array_equal(sets["20x"].features, feats)
    assert sets["20x"].failed.tolist() == failed.tolist()


def test_checksums_and_required_chunks(tmp_path):
    """A changed byte fails the crc32c; a missing chunk reads as fill unless chunks are required."""
    data = np.arange(40, dtype="float32").reshape(20, 2) + 1
    _write(tmp_path / "a", data, chunks=(8, 2), compressors=[zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()])
    chunk = tmp_path / "a" / "c" / "1" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x40
    chunk.write_bytes(bytes(raw))
    with pytest.raises(zarr_io.DamagedChunk, match=r"a/c/1/0: checksum mismatch"):
        zarr_io.read_array(tmp_path / "a")
    chunk.unlink()
    got = zarr_io.read_array(tmp_path / "a")
    assert (got[8:16] == 0).all() and (got[:8] == data[:8]).all()
    with pytest.raises(zarr_io.DamagedChunk, match=r"a/c/1/0: chunk missing"):
        zarr_io.read_array(tmp_path / "a", require_chunks=True)


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=300), flip=st.integers(0, 303 * 8 - 1))
def test_crc32c_residue_check_is_the_plain_check(body, flip):
    """The residue check over the whole chunk accepts exactly what comparing the body's crc32c
    with the trailer accepts: the intact chunk, and never one with any single bit flipped."""
    import google_crc32c

    raw = body + google_crc32c.value(body).to_bytes(4, "little")
    assert bytes(zarr_io._unwrap_crc32c(raw, "k")) == body
    bad = bytearray(raw)
    bad[(flip // 8) % len(raw)] ^= 1 << (flip % 8)
    with pytest.raises(zarr_io.DamagedChunk, match=r"^k: checksum mismatch"):
        zarr_io._unwrap_crc32c(bytes(bad), "k")
    for short in (b"", b"abc"):
        with pytest.raises(zarr_io.DamagedChunk):
            zarr_io._unwrap_crc32c(short, "k")


def test_undecodable_chunk_names_its_file(tmp_path):
    """Without a checksum (stores written before it), garbage bytes fail in the decoder: one
    DamagedChunk naming the chunk file, not a bare Blosc error."""
    data = np.arange(40, dtype="float16").reshape(20, 2) + 1
    _write(tmp_path / "a", data, chunks=(8, 2), compressors=zarr.codecs.BloscCodec(cname="lz4", shuffle="bitshuffle"))
    (tmp_path / "a" / "c" / "2" / "0").write_bytes(b"\x02\x01" + b"\x00" * 30)
    with pytest.raises(zarr_io.DamagedChunk, match=r"a/c/2/0: cannot decode"):
        zarr_io.read_array(tmp_path / "a")


def test_big_endian_arrays_read_by_the_lean_path(tmp_path):
    data = np.arange(60, dtype="float32").reshape(20, 3) / 7
    arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, dtype=data.dtype, chunks=(8, 3),
                            serializer=zarr.codecs.BytesCodec(endian="big"))
    arr[...] = data
    assert zarr_io._lean_plan(zarr_io.read_node_meta(tmp_path / "a")) is not None
    got = zarr_io.read_array(tmp_path / "a")
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, data)
