"""`python -m pipeline verify`: clean on fresh results, and every kind of damage is reported."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tissue_image, write_tiff

from pipeline.cli import main
from pipeline.config import TilingConfig
from pipeline.features.extract import ExtractConfig, extract_features
from pipeline.store import FeatureStoreMeta, FeatureStoreWriter, read_tile_store, write_failed_store
from pipeline.tiling.stage import tile_to_store
from pipeline.verify import verify_results

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ENC = "resnet18_simclr"


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """Two slides tiled, one of them also extracted: <base>/slides/*.tif, <base>/results/c/..."""
    base = tmp_path_factory.mktemp("verify")
    (base / "slides").mkdir()
    res = base / "results" / "c"
    for i in range(2):
        slide = write_tiff(base / "slides" / f"s{i}.tif", tissue_image(896, 768, seed=10 + i, blobs=4), mpp=0.5, levels=2)
        tile_to_store(slide, res / "tiles" / f"s{i}.zarr", TilingConfig(tile_size=64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin badly on busy shared cores
    try:
        extract_features(res / "tiles" / "s0.zarr", res / "features" / ENC / "s0.zarr", ENC,
                         cfg=ExtractConfig(num_workers=0, batch_size=16))
    finally:
        torch.set_num_threads(threads)
    for i in range(2):  # the checks below need tiles at every magnification
        assert min(map(len, read_tile_store(res / "tiles" / f"s{i}.zarr").tiles.values())) >= 2
    return base


@pytest.fixture
def res(clean, tmp_path) -> Path:
    """A private copy of the clean results (the slides stay shared: their paths are in the stores)."""
    shutil.copytree(clean / "results", tmp_path / "results")
    return tmp_path / "results" / "c"


def run_cli(capsys, *paths) -> tuple[int, str]:
    rc = main(["verify", *map(str, paths)])
    return rc, capsys.readouterr().out


def test_fresh_results_are_clean(clean, capsys):
    assert verify_results([clean / "results"]) == []
    rc, out = run_cli(capsys, clean / "results")
    assert rc == 0 and out.strip().splitlines()[-1] == "verify: OK, 3 store(s) checked (1 features, 2 tiles)"
    # a store path works as well as a results folder
    rc, out = run_cli(capsys, clean / "results" / "c" / "features" / ENC / "s0.zarr")
    assert rc == 0, out


def _delete_feature_chunk(res: Path) -> None:
    chunks = sorted((res / "features" / ENC / "s0.zarr" / "20x" / "features" / "c").rglob("*"))
    next(p for p in chunks if p.is_file()).unlink()


def _coords_out_of_slide(res: Path) -> None:
    arr = zarr.open_array(str(res / "tiles" / "s1.zarr" / "20x" / "coords"), mode="r+")
    arr[0] = [10**6, 5]


def _nan_feature(res: Path) -> None:
    arr = zarr.open_array(str(res / "features" / ENC / "s0.zarr" / "10x" / "features"), mode="r+")
    arr[1, 3] = np.nan


def _break_parent(res: Path) -> None:
    arr = zarr.open_array(str(res / "tiles" / "s1.zarr" / "20x" / "parent"), mode="r+")
    p = arr[...]
    i = int(np.flatnonzero(p >= 0)[0])
    n10 = len(read_tile_store(res / "tiles" / "s1.zarr").tiles["10x"])
    arr[i] = (p[i] + 1) % n10 if n10 > 1 else 5  # another (or no) 10x tile


def _partial_dir(res: Path) -> None:
    ts = read_tile_store(res / "tiles" / "s1.zarr").tiles
    FeatureStoreWriter(res / "features" / ENC / "s1.zarr", ts, {m: 8 for m in ts}, FeatureStoreMeta(encoder=ENC)).close()


def _tmp_dir(res: Path) -> None:
    (res / "tiles" / ".s1.zarr.tmp-otherhost-123").mkdir()


def _retiled(res: Path) -> None:
    a = read_tile_store(res / "tiles" / "s0.zarr").meta
    tile_to_store(a.slide_path, res / "tiles" / "s0.zarr", TilingConfig(tile_size=64, tissue_threshold=0.6))


def _truncated_chunk(res: Path) -> None:
    chunk = next(p for p in (res / "tiles" / "s1.zarr" / "10x" / "coords" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:7])


def _root_metadata(res: Path) -> None:
    (res / "tiles" / "s1.zarr" / "zarr.json").write_text("{")


def _region_changed(res: Path) -> None:
    arr = zarr.open_array(str(res / "features" / ENC / "s0.zarr" / "10x" / "region"), mode="r+")
    arr[...] = arr[...] + 1  # a valid chunk (checksum and all), other values than the tile store's


def _region_chunk_deleted(res: Path) -> None:
    (res / "features" / ENC / "s0.zarr" / "20x" / "region" / "c" / "0").unlink()


def _flipped_byte(res: Path) -> None:
    chunk = res / "features" / ENC / "s0.zarr" / "5x" / "features" / "c" / "0" / "0"
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2] ^= 1
    chunk.write_bytes(bytes(b))


def _status_flipped(res: Path) -> None:
    import json

    meta = json.loads((res / "tiles" / "s1.zarr" / "zarr.json").read_text())
    meta["attributes"]["status"] = "failed"
    (res / "tiles" / "s1.zarr" / "zarr.json").write_text(json.dumps(meta))


DAMAGE = {
    "chunk deleted": (_delete_feature_chunk, "features/resnet18_simclr/s0.zarr: damaged chunk: 20x/features: c/0/0: chunk missing"),
    "region changed": (_region_changed, "features/resnet18_simclr/s0.zarr: 10x/region: differs from the tile store's"),
    "region chunk deleted": (_region_chunk_deleted, "features/resnet18_simclr/s0.zarr: damaged chunk: 20x/region: c/0: chunk missing"),
    "flipped byte": (_flipped_byte, "features/resnet18_simclr/s0.zarr: damaged chunk: 5x/features: c/0/0: checksum mismatch"),
    "status flipped": (_status_flipped, "tiles/s1.zarr: broken: status 'failed' but no error recorded"),
    "coords out of slide": (_coords_out_of_slide, "tiles/s1.zarr: 20x/coords: 1 tile(s) outside the slide (level-0 768x896), first #0 at (1000000, 5)"),
    "NaN feature": (_nan_feature, "features/resnet18_simclr/s0.zarr: 10x/features: 1 non-finite value(s) (NaN/inf), first in tile #1"),
    "parent link": (_break_parent, "tiles/s1.zarr: 20x/parent: 1 link(s) to a 10x tile that does not contain the child"),
    "partial dir": (_partial_dir, "features/resnet18_simclr/s1.zarr: incomplete (interrupted run; rerun to resume): s1.zarr.partial left behind"),
    "tmp dir": (_tmp_dir, "tiles/s1.zarr: incomplete (interrupted run; rerun to resume): .s1.zarr.tmp-otherhost-123 left behind"),
    "retiled": (_retiled, "features/resnet18_simclr/s0.zarr: stale: tiles changed since extraction"),
    "truncated chunk": (_truncated_chunk, "tiles/s1.zarr: unreadable:"),
    "root metadata": (_root_metadata, "tiles/s1.zarr: broken: unreadable root metadata (zarr.json)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_reported(res, damage, capsys):
    fn, expected = DAMAGE[damage]
    fn(res)
    n20 = zarr.open_array(str(res / "features" / ENC / "s0.zarr" / "20x" / "failed"), mode="r").shape[0]
    expected = expected.format(n=n20)
    rc, out = run_cli(capsys, res.parent)
    lines = [ln.removeprefix(str(res) + "/") for ln in out.strip().splitlines()]
    assert rc == 1, out
    assert any(ln.startswith(expected) for ln in lines), f"{expected!r} not in:\n{out}"
    assert lines[-1].startswith("verify: FAILED"), out


def test_changed_slide_is_stale(clean, tmp_path, capsys):
    slide = clean / "slides" / "s0.tif"
    original, st = slide.read_bytes(), slide.stat()
    try:
        write_tiff(slide, tissue_image(896, 768, seed=99, blobs=4), mpp=0.5, levels=2)
        problems = verify_results([clean / "results"])
    finally:  # restored as a backup would be (bytes and mtime): the fingerprint covers both
        slide.write_bytes(original)
        os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    got = {(Path(p.store).name, p.problem, p.severity) for p in problems}
    assert got == {("s0.zarr", f"stale: slide changed since tiling ({slide})", "stale"),
                   ("s0.zarr", "stale: slide changed since tiling", "stale")}, got
    assert verify_results([clean / "results"]) == []  # restored


def test_store_being_written_is_told_apart_from_an_interrupted_one(res):
    ts = read_tile_store(res / "tiles" / "s1.zarr").tiles
    writer = FeatureStoreWriter(res / "features" / ENC / "s1.zarr", ts, {m: 8 for m in ts}, FeatureStoreMeta(encoder=ENC))
    try:
        problems = [str(p) for p in verify_results([res])]
    finally:
        writer.close()
    assert problems == [f"{res}/features/{ENC}/s1.zarr: being written now by process {os.getpid()} "
                        "(s1.zarr.partial); verify again when it has finished"]
    assert [p.problem.split(":")[0] for p in verify_results([res])] == ["incomplete (interrupted run; rerun to resume)"]


def test_failed_store_is_listed_but_not_an_error(res, capsys):
    write_failed_store(res / "tiles" / "bad.zarr", "tiles", "bad", "bad.svs: cannot open: not a slide")
    rc, out = run_cli(capsys, res.parent)
    assert rc == 0, out
    assert f"{res}/tiles/bad.zarr: failed: bad.svs: cannot open: not a slide" in out
    assert "1 failed slide(s) recorded" in out.splitlines()[-1]


def test_nothing_to_verify(tmp_path, capsys):
    rc, out = run_cli(capsys, tmp_path, tmp_path / "nope")
    assert rc == 1 and f"{tmp_path}: no tile or feature stores found" in out and f"{tmp_path / 'nope'}: not found" in out


def test_cli_output_on_a_damaged_store(clean, res):
    """Several damages at once, through the real command line; the output is printed for the record."""
    for fn in (_delete_feature_chunk, _coords_out_of_slide, _nan_feature, _break_parent, _partial_dir, _retiled):
        fn(res)
    write_failed_store(res / "tiles" / "bad.zarr", "tiles", "bad", "bad.svs: cannot open: not a slide")
    slide = clean / "slides" / "s1.tif"
    original = slide.read_bytes()
    try:
        write_tiff(slide, tissue_image(896, 768, seed=99, blobs=4), mpp=0.5, levels=2)
        r = subprocess.run([sys.executable, "-m", "pipeline", "verify", "results"], capture_output=True, text=True,
                           cwd=res.parent.parent)
    finally:
        slide.write_bytes(original)
    print(f"\n$ python -m pipeline verify results; echo $?\n{r.stdout}{r.stderr}{r.returncode}")
    assert r.returncode == 1 and r.stderr == ""
    out = r.stdout.strip().splitlines()
    assert len(out) >= 6 and out[-1].startswith("verify: FAILED, ") and "in 3 store(s); 4 store(s) checked" in out[-1]
