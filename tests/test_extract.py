"""Feature extraction: stores, determinism, resume after kill -9 (injected after committed chunks),
decode failures, locking."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from conftest import digest, shared_slide, tissue_image, write_tiff
from killpoints import run_killed

from pipeline.config import TilingConfig
from pipeline.errors import SlideError
from pipeline.features.extract import ExtractConfig, extract_features
from pipeline.store import (
    FeatureStoreMeta,
    FeatureStoreWriter,
    StoreBusy,
    TileStoreMeta,
    read_feature_store,
    read_tile_store,
    store_status,
)
from pipeline.tiling.stage import tile_to_store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext")
    slide = write_tiff(d / "s.tif", tissue_image(2400, 2400, seed=3, blobs=5), mpp=0.5, levels=3)
    tile_to_store(slide, d / "s.zarr", TilingConfig(tile_size=64))
    return d, slide


def test_extract_writes_self_contained_store(tiled, tmp_path):
    d, slide = tiled
    cfg = ExtractConfig(batch_size=16, num_workers=0, chunk_batches=2)
    counts = extract_features(d / "s.zarr", tmp_path / "f.zarr", "resnet18_simclr", cfg=cfg)
    ts = read_tile_store(d / "s.zarr")
    meta, feats = read_feature_store(tmp_path / "f.zarr")
    assert counts == {m: len(t) for m, t in ts.tiles.items()} and counts["20x"] > 40
    for m, f in feats.items():
        assert f.features.shape == (len(ts.tiles[m]), 512) and f.features.dtype == np.float16
        assert np.isfinite(f.features).all() and not f.failed.any()
        np.testing.assert_array_equal(f.coords, ts.tiles[m].coords)
        np.testing.assert_array_equal(f.region, ts.tiles[m].region)
    assert meta.encoder == "resnet18_simclr" and meta.get("pretrained") is False
    assert meta.tiles_sha256 == ts.meta.tiles_sha256 and "ToTensor" in meta.get("transform")
    assert meta.slide_fingerprint == ts.meta.slide_fingerprint and meta.target_mpp == ts.meta.tiling["magnifications"]
    # deterministic: same inputs, same bytes, whatever the worker count
    extract_features(d / "s.zarr", tmp_path / "g.zarr", "resnet18_simclr",
                     cfg=ExtractConfig(batch_size=16, num_workers=1, chunk_batches=2))
    assert digest(tmp_path / "f.zarr") == digest(tmp_path / "g.zarr")


def test_only_requested_mags(tiled, tmp_path):
    d, _ = tiled
    extract_features(d / "s.zarr", tmp_path / "f.zarr", "resnet18_simclr", mags=["10x", "5x"],
                     cfg=ExtractConfig(num_workers=0))
    meta, feats = read_feature_store(tmp_path / "f.zarr")
    assert list(feats) == ["10x", "5x"] and meta.magnifications == ("10x", "5x")


def _progress_after(counts: dict[str, int], chunk: int, writes: int) -> dict[str, int]:
    """Rows committed per magnification after `writes` chunk writes (magnifications in order)."""
    done = dict.fromkeys(counts, 0)
    for m, n in counts.items():
        while done[m] < n and writes:
            done[m], writes = min(done[m] + chunk, n), writes - 1
    return done


def test_kill9_after_committed_chunks_resumes_byte_identical(tiled, tmp_path):
    """SIGKILL right after the 1st committed chunk, then (resumed) after the last one, before the
    store is renamed: the .partial store holds exactly the committed chunks each time, and the
    last run ends byte-identical to an unkilled one."""
    d, _ = tiled
    batch = 1  # small chunks (batch x chunk_batches rows): the 29 5x tiles make two
    args = ["extract", str(d / "s.zarr"), "--encoder", "resnet18_simclr", "--batch-size", str(batch),
            "--workers", "0", "--mags", "5x"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    assert subprocess.run([sys.executable, "-m", "pipeline", *args, "--out", str(ref)],
                          capture_output=True).returncode == 0
    _, ref_feats = read_feature_store(ref)
    counts = {m: len(f.features) for m, f in ref_feats.items()}
    chunk = batch * ExtractConfig().chunk_batches
    assert chunk < counts["5x"] <= 2 * chunk  # two chunks, the second a partial one
    partial = out.with_name(out.name + ".partial")
    committed = 0
    for writes in (1, 1):  # after the first chunk; resumed, after the last one, before the rename
        run_killed(f"pipeline.store:FeatureStoreWriter.write:{writes}:after", *args, "--out", str(out))
        committed += writes  # a resumed run continues after the last committed chunk
        assert not out.exists(), "a killed run must not leave a final store"
        done = json.loads((partial / "progress.json").read_text())
        assert done == _progress_after(counts, chunk, committed)
        for m, rows in done.items():
            got = zarr.open_array(str(partial / m / "features"), mode="r")[:rows]
            np.testing.assert_array_equal(got, ref_feats[m].features[:rows])
    r = subprocess.run([sys.executable, "-m", "pipeline", *args, "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    assert digest(out) == digest(ref)


def test_resume_continues_after_last_chunk(tiled, tmp_path, monkeypatch):
    """A partial store with committed rows is continued, not restarted."""
    d, _ = tiled
    out = tmp_path / "f.zarr"
    cfg = ExtractConfig(batch_size=8, num_workers=0, chunk_batches=1)
    import pipeline.features.extract as ex

    calls = {"n": 0}
    real = ex.Encoder.__call__

    def boom(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(ex.Encoder, "__call__", boom)
    with pytest.raises(KeyboardInterrupt):
        extract_features(d / "s.zarr", out, "resnet18_simclr", cfg=cfg)
    monkeypatch.setattr(ex.Encoder, "__call__", real)
    seen = []
    monkeypatch.setattr(ex.Encoder, "__call__", lambda self, x: (seen.append(len(x)), real(self, x))[1])
    extract_features(d / "s.zarr", out, "resnet18_simclr", cfg=cfg)
    n_total = sum(len(t) for t in read_tile_store(d / "s.zarr").tiles.values())
    assert sum(seen) == n_total - 16  # two committed chunks of 8 were not recomputed


def test_unreadable_tile_fails_slide_naming_coords_or_is_recorded(tmp_path):
    slide = shared_slide("broken/unreadable.svs")
    store = tmp_path / "u.zarr"
    from pipeline.store import TileSet, write_tile_store

    one = TileSet(coords=np.array([[0, 0]]), grid=np.array([[0, 0]], np.int32), tissue=np.ones(1, np.float32),
                  region=np.zeros(1, np.int32), parent=np.array([-1]))
    from pipeline.slides import fingerprint

    write_tile_store(store, {"20x": one}, TileStoreMeta(slide_id="unreadable", slide_path=str(slide), base_mpp=0.499,
                                                         slide_fingerprint=fingerprint(slide),
                                                         tiling={"tile_size": 64, "magnifications": {"20x": 0.5}}))
    with pytest.raises(SlideError, match=r"unreadable: tile 20x #0 at level-0 \(0, 0\) failed to decode.*Bogus"):
        extract_features(store, tmp_path / "f.zarr", "resnet18_simclr", cfg=ExtractConfig(num_workers=0))
    assert store_status(tmp_path / "f.zarr") == "missing"
    extract_features(store, tmp_path / "f.zarr", "resnet18_simclr",
                     cfg=ExtractConfig(num_workers=0, on_tile_error="record"))
    _, feats = read_feature_store(tmp_path / "f.zarr")
    assert feats["20x"].failed.tolist() == [True] and (feats["20x"].features == 0).all()


def test_changed_slide_is_refused(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(800, 800), mpp=0.5, tiled=False)
    tile_to_store(slide, tmp_path / "s.zarr", TilingConfig(tile_size=64))
    write_tiff(slide, tissue_image(800, 800, seed=9), mpp=0.5, tiled=False)
    with pytest.raises(SlideError, match="changed since tiling"):
        extract_features(tmp_path / "s.zarr", tmp_path / "f.zarr", "resnet18_simclr", cfg=ExtractConfig(num_workers=0))


def test_second_writer_is_refused(tiled, tmp_path):
    d, _ = tiled
    ts = read_tile_store(d / "s.zarr").tiles
    w = FeatureStoreWriter(tmp_path / "f.zarr", ts, {m: 4 for m in ts}, FeatureStoreMeta(encoder="x"))
    with pytest.raises(StoreBusy, match="another writer in this process"):
        FeatureStoreWriter(tmp_path / "f.zarr", ts, {m: 4 for m in ts}, FeatureStoreMeta(encoder="x"))
    w.close()
    FeatureStoreWriter(tmp_path / "f.zarr", ts, {m: 4 for m in ts}, FeatureStoreMeta(encoder="x")).close()


def test_cli_extract_record_failure(tmp_path):
    from pipeline.store import write_failed_store

    write_failed_store(tmp_path / "t.zarr", "tiles", "bad", "bad.svs: cannot open")
    cmd = [sys.executable, "-m", "pipeline", "extract", str(tmp_path / "t.zarr"), "--encoder", "resnet18_simclr",
           "--out", str(tmp_path / "f.zarr")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "bad.svs: cannot open" in r.stderr
    r = subprocess.run(cmd + ["--record-failure"], capture_output=True, text=True)
    assert r.returncode == 0 and store_status(tmp_path / "f.zarr") == "failed"


def test_out_of_memory_halves_the_batch(tiled, tmp_path, monkeypatch):
    """A CUDA OOM on a big batch halves the encoder batch and goes on, same features."""
    import torch

    import pipeline.features.extract as ex

    d, _ = tiled
    ref = tmp_path / "ref.zarr"
    extract_features(d / "s.zarr", ref, "resnet18_simclr", mags=["5x"], cfg=ExtractConfig(num_workers=0, batch_size=8))
    real = ex.Encoder._run

    def fake(self, x):
        if len(x) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, x)

    monkeypatch.setattr(ex.Encoder, "_run", fake)
    out = tmp_path / "oom.zarr"
    extract_features(d / "s.zarr", out, "resnet18_simclr", mags=["5x"], cfg=ExtractConfig(num_workers=0, batch_size=8))
    a = read_feature_store(ref)[1]["5x"].features
    b = read_feature_store(out)[1]["5x"].features
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
