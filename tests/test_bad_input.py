"""Bad input never gives a silent wrong result nor stops a cohort (issue 14): damaged JPEG tiles,
truncated and forged slides, non-finite or lost features, edited slides, tiny sheets, kill -9
during extraction, bad options and weights files. Each refusal is one line naming the file."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import shared_slide, tissue_image, write_tiff

from pipeline.config import TilingConfig
from pipeline.errors import ConfigError, SheetError, SlideError
from pipeline.features.extract import ExtractConfig, extract_features
from pipeline.mil.splits import check_splittable, make_splits
from pipeline.slides import open_slide
from pipeline.slides.files import fingerprint, fingerprint_matches, legacy_fingerprint
from pipeline.slides.sheet import SlideRow, parse_sheet
from pipeline.store import read_feature_store, read_tile_store, store_status
from pipeline.tiling.stage import tile_to_store

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ENC = "resnet18_simclr"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The stderr of a refused command: exactly one line, starting with `error:`."""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 3-level JPEG TIFF (64-px TIFF tiles = one 20x tile each), tiled, and one feature store."""
    d = tmp_path_factory.mktemp("bad")
    slide = write_tiff(d / "s.tif", tissue_image(768, 768, seed=4, blobs=4), mpp=0.5, levels=3)
    tile_to_store(slide, d / "s.zarr", TilingConfig(tile_size=64))
    extract_features(d / "s.zarr", d / "f.zarr", ENC, mags=["20x"], cfg=ExtractConfig(num_workers=0, batch_size=16,
                                                                                     chunk_batches=1))
    return d, slide


# --------------------------------------------------------------------------- 1. one bad JPEG tile


def test_undecodable_jpeg_tiles_fail_alone(small, tmp_path):
    """`record`: exactly the tiles whose JPEG data is damaged are failed, every other tile is encoded
    (OpenSlide's handle stays in an error state after one decode error: it is reopened)."""
    d, src = small
    slide = tmp_path / "s.tif"
    data = bytearray(src.read_bytes())
    coords = read_tile_store(d / "s.zarr").tiles["20x"].coords
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        across = -(-page.shape[1] // page.tilewidth)
        offsets, counts = page.dataoffsets, page.databytecounts
    bad = [len(coords) // 4, len(coords) // 2, len(coords) // 2 + 1]  # kept tiles mid-file
    for i in bad:
        t = int(coords[i, 1] // 64 * across + coords[i, 0] // 64)
        data[offsets[t] + 8 : offsets[t] + counts[t]] = b"\xff" * (counts[t] - 8)
    slide.write_bytes(bytes(data))
    tiles = tmp_path / "t.zarr"
    tile_to_store(slide, tiles, TilingConfig(tile_size=64))  # the mask reads the (intact) lower levels
    assert np.array_equal(read_tile_store(tiles).tiles["20x"].coords, coords)
    extract_features(tiles, tmp_path / "f.zarr", ENC, mags=["20x"],
                     cfg=ExtractConfig(num_workers=0, batch_size=16, on_tile_error="record"))
    _, feats = read_feature_store(tmp_path / "f.zarr")
    f = feats["20x"]
    assert np.flatnonzero(f.failed).tolist() == bad
    assert (f.features[f.failed] == 0).all() and f.features[~f.failed].any(axis=1).all()


# --------------------------------------------------------------------------- 2. truncated and damaged slides


@pytest.mark.parametrize("size", [100, 5000, 193895, 1_200_000, 1_600_000, 1_938_000])
def test_truncated_svs_is_a_slide_error(cmu, tmp_path, size):
    t = tmp_path / "t.svs"
    t.write_bytes(cmu.read_bytes()[:size])
    with pytest.raises(SlideError, match=r"^t\.svs: file is truncated or damaged: .*the file has"):
        open_slide(t)


def test_truncated_slide_is_recorded_and_the_cohort_goes_on(cmu, tmp_path):
    t = tmp_path / "t.svs"
    t.write_bytes(cmu.read_bytes()[:193895])
    r = cli("tile", str(t), "--out", str(tmp_path / "x.zarr"))
    assert r.returncode == 2 and "t.svs: file is truncated or damaged" in one_error_line(r)
    r = cli("tile", str(t), "--out", str(tmp_path / "x.zarr"), "--qc", str(tmp_path / "x.png"), "--record-failure")
    assert r.returncode == 0, r.stderr
    assert store_status(tmp_path / "x.zarr") == "failed" and (tmp_path / "x.png").exists()


def test_damaged_tiffs_only_ever_raise_slide_errors(tmp_path):
    """Truncations and overwritten bytes anywhere in a pyramidal TIFF: open + mask-sized read
    either work or raise a SlideError, never another exception."""
    src = write_tiff(tmp_path / "s.tif", tissue_image(512, 512, seed=1), mpp=0.5, levels=2)
    raw = src.read_bytes()
    rng = np.random.default_rng(0)
    variants = [raw[:n] for n in np.linspace(8, len(raw) - 1, 12).astype(int)]
    for _ in range(24):
        b = bytearray(raw)
        at = int(rng.integers(0, len(b) - 16))
        b[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        variants.append(bytes(b))
    refused = 0
    for i, v in enumerate(variants):
        p = tmp_path / f"v{i}.tif"
        p.write_bytes(v)
        try:
            with open_slide(p) as s:
                s.thumbnail(4.0)
                s.read(0, 0, 64, 0.5)
        except SlideError as e:
            assert str(e).startswith(f"v{i}.tif: ") and "\n" not in str(e)
            refused += 1
    assert refused >= 12  # every truncation at least


# --------------------------------------------------------------------------- 3. non-finite and lost features


def test_non_finite_features_fail_the_slide_at_write(small, tmp_path, monkeypatch):
    import pipeline.features.extract as ex

    d, _ = small
    real = ex.Encoder.__call__

    def nan_row(self, x):
        out = real(self, x)
        out[min(2, len(out) - 1), 5] = float("nan")
        return out

    monkeypatch.setattr(ex.Encoder, "__call__", nan_row)
    with pytest.raises(SlideError, match=r"^s: encoder 'resnet18_simclr' gave non-finite features .* first #2 at level-0"):
        extract_features(d / "s.zarr", tmp_path / "f.zarr", ENC, mags=["20x"], cfg=ExtractConfig(num_workers=0))
    assert store_status(tmp_path / "f.zarr") == "missing"


def _copy_store(small, tmp_path) -> Path:
    import shutil

    d, _ = small
    shutil.copytree(d / "f.zarr", tmp_path / "f.zarr")
    return tmp_path / "f.zarr"


def test_non_finite_features_are_refused_at_load(small, tmp_path):
    from pipeline.mil.bags import load_bag

    f = _copy_store(small, tmp_path)
    arr = zarr.open_array(str(f / "20x" / "features"), mode="r+")  # a valid chunk, NaN inside
    arr[3, 0] = np.inf
    with pytest.raises(SlideError, match=r"^s: feature store .*f\.zarr: 1 20x tile\(s\) with non-finite features \(NaN/inf\), first #3"):
        read_feature_store(f)
    with pytest.raises(SlideError, match="non-finite"):
        load_bag("s", {"20x": f}, 0, 4)


@pytest.mark.parametrize("damage", ["deleted", "flipped", "garbage"])
def test_lost_or_damaged_chunks_are_refused_at_load(small, tmp_path, damage):
    f = _copy_store(small, tmp_path)
    chunk = f / "20x" / ("region" if damage == "deleted" else "features") / "c" / ("0" if damage == "deleted" else "1/0")
    if damage == "deleted":
        chunk.unlink()
    elif damage == "flipped":
        b = bytearray(chunk.read_bytes())
        b[len(b) // 2] ^= 0x10
        chunk.write_bytes(bytes(b))
    else:
        chunk.write_bytes(b"\x00" * 40)
    why = {"deleted": "chunk missing", "flipped": "checksum mismatch", "garbage": "checksum mismatch"}[damage]
    with pytest.raises(SlideError, match=rf"^s: feature store .*f\.zarr is damaged \(.*{why}.*\); delete it"):
        read_feature_store(f)


def test_metrics_json_is_strict_json_when_auc_is_undefined(tmp_path):
    """One class in the test part: AUC is undefined -> null (not the invalid `NaN`), and the
    cross-fold summary still reads it."""
    from pipeline.mil.bags import cohort_cache
    from pipeline.mil.metrics import summarize
    from pipeline.mil.train import TrainConfig, evaluate_fold, train_fold
    from pipeline.synthetic.bags import SynthConfig, make_cohort

    c = make_cohort(tmp_path / "c", SynthConfig(n_slides=8, seed=1, dim=8, regions=(4, 6), lesion_regions=(1, 2)))
    cache, classes = cohort_cache(c.sheet, c.feature_dirs, 2)
    cfg = TrainConfig(epochs=1, min_epochs=1, model={"d": 8, "attn_dim": 4, "n_groups": 2})
    ckpt = train_fold("abmil_3", cache, c.slides[:6], [], classes, list(c.feature_dirs), cfg, tmp_path / "m", {})
    one_class = [s for s in c.slides if c.labels[s] == c.labels[c.slides[0]]]
    evaluate_fold(ckpt, cache, one_class, tmp_path / "m" / "fold_0")

    def no_constants(name):
        raise AssertionError(f"metrics.json holds {name}")

    m = json.loads((tmp_path / "m" / "fold_0" / "metrics.json").read_text(), parse_constant=no_constants)
    assert m["auc"] is None and 0 <= m["acc"] <= 1
    per_fold, table = summarize([tmp_path / "m" / "fold_0" / "metrics.json"])
    assert np.isnan(per_fold["auc"].iloc[0]) and np.isfinite(per_fold["acc"].iloc[0])


# --------------------------------------------------------------------------- 4. in-place edits of a slide


def test_fingerprint_catches_in_place_edits(tmp_path):
    f = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    f.write_bytes(rng.integers(0, 256, 24 << 20, dtype=np.uint8).tobytes())  # 24 MiB: sampled, not read whole
    st = f.stat()
    fp, legacy = fingerprint(f), legacy_fingerprint(f)
    with open(f, "r+b") as fh:  # rewrite 640 KiB in the middle, same size (~655k px of a tile)
        fh.seek(12 << 20)
        fh.write(b"\x00" * (640 << 10))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert fingerprint(f) != fp and not fingerprint_matches(f, fp)  # the mtime moved
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint(f) != fp  # mtime put back: a sampled block still differs
    assert legacy_fingerprint(f) == legacy  # head + tail only (the old fingerprint) saw nothing
    g = tmp_path / "old.bin"
    g.write_bytes(b"x" * 100)
    assert fingerprint_matches(g, legacy_fingerprint(g))  # stores written before still match


def test_edited_slide_is_stale_for_verify_and_refused_by_extract(tmp_path):
    from pipeline.verify import verify_results

    slide = write_tiff(tmp_path / "s.tif", tissue_image(1280, 1280, seed=2), mpp=0.5, tiled=False)
    assert slide.stat().st_size > 3 << 20  # beyond the old fingerprint's head + tail
    res = tmp_path / "results"
    tile_to_store(slide, res / "tiles" / "s.zarr", TilingConfig(tile_size=64))
    assert verify_results([res]) == []
    st = slide.stat()
    with open(slide, "r+b") as fh:  # 512 rows of pixels in the middle of the strips, in place
        fh.seek(st.st_size // 2)
        fh.write(b"\x80" * (512 * 1280 * 3 // 4))
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert [p.problem for p in verify_results([res])] == [f"stale: slide changed since tiling ({slide})"]
    with pytest.raises(SlideError, match="changed since tiling"):
        extract_features(res / "tiles" / "s.zarr", tmp_path / "f.zarr", ENC, cfg=ExtractConfig(num_workers=0))


# --------------------------------------------------------------------------- 6. sheets that cannot give the folds


def _rows(labels_patients: list[tuple[str, str]], split: list[str | None] | None = None) -> list[SlideRow]:
    split = split or [None] * len(labels_patients)
    return [SlideRow(f"s{i}", Path("/x"), lab, pat, None, sp) for i, ((lab, pat), sp) in enumerate(zip(labels_patients, split))]


@pytest.mark.parametrize("rows, k, msg", [
    (_rows([("a", "p1"), ("b", "p2"), ("a", "p3")]), 5, r"3 patient\(s\), fewer than the 5 folds"),
    (_rows([("a", f"p{i}") for i in range(6)]), 2, r"only one class \('a'\) in 6 slide\(s\)"),
    (_rows([("a", f"p{i}") for i in range(6)] + [("b", "q1"), ("b", "q2")]), 3, r"class 'b' has 2 patient\(s\), fewer than the 3 folds"),
    (_rows([("a", "p1"), ("b", "p2"), ("a", "p3"), ("b", "p4")], ["train"] * 4), 2, "marks no slide 'test'"),
    (_rows([("a", "p1"), ("b", "p2"), ("a", "p3"), ("b", "p1")], ["train", "train", "train", "test"]), 2,
     r"patient\(s\) \['p1'\] have slides both in the test split and outside it"),
])
def test_sheets_that_cannot_give_the_folds_are_refused(rows, k, msg):
    with pytest.raises(SheetError, match=msg):
        check_splittable(rows, k)
    with pytest.raises(SheetError, match=msg):
        make_splits(rows, k)


def test_cli_splits_refuses_fewer_patients_than_folds(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("slide_id\tpath\tlabel\tpatient_id\n" + "".join(f"s{i}\tx.svs\t{'ab'[i % 2]}\tp{i}\n" for i in range(3)))
    r = cli("splits", "--sheet", str(sheet), "--out", str(tmp_path / "splits.tsv"), "--folds", "5")
    assert r.returncode == 2 and "3 patient(s), fewer than the 5 folds" in one_error_line(r)
    assert not (tmp_path / "splits.tsv").exists()


# --------------------------------------------------------------------------- 7. kill -9 of extract, rerun at once

KILL_AFTER_FIRST_CHUNK = r"""
import os, signal, sys
import pipeline.store as st
real = st.FeatureStoreWriter.write
def write(self, *a, **k):
    real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # its DataLoader worker is alive, decoding ahead
st.FeatureStoreWriter.write = write
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_extract_lock_is_free_right_after_kill9(small, tmp_path):
    from pipeline.store import FeatureStoreMeta, FeatureStoreWriter

    d, _ = small
    out = tmp_path / "f.zarr"
    args = ["extract", str(d / "s.zarr"), "--encoder", ENC, "--out", str(out), "--mags", "20x",
            "--batch-size", "16", "--workers", "1"]
    log = tmp_path / "killed.log"
    with open(log, "w") as fh:  # not a pipe: waiting for a pipe's end would wait for the orphaned worker
        p = subprocess.Popen([sys.executable, "-c", KILL_AFTER_FIRST_CHUNK, *args], stdout=fh, stderr=subprocess.STDOUT,
                             env=ENV)
        assert p.wait() == -signal.SIGKILL, log.read_text()[-2000:]
    tiles = read_tile_store(d / "s.zarr").tiles
    # at once (the dead writer's DataLoader worker is still alive for seconds): the store is free
    FeatureStoreWriter(out, {"20x": tiles["20x"]}, {"20x": 512}, FeatureStoreMeta(encoder=ENC)).close()
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    a = read_feature_store(out)[1]["20x"].features
    b = read_feature_store(d / "f.zarr")[1]["20x"].features
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)


# --------------------------------------------------------------------------- 8. forged size


def forged_tiff(path: Path, side: int = 200_000, tile: int = 4096) -> Path:
    """A valid classic TIFF declaring side x side RGB px whose tiles all point at one deflate tile
    (~70 KB on disk; OpenSlide opens it as generic-tiff and decodes that tile 2,401 times)."""
    n = (-(-side // tile)) ** 2
    data = zlib.compress(np.full((tile, tile, 3), 240, np.uint8).tobytes(), 9)
    offs = 8 + len(data)
    bps, res = offs + 8 * n, offs + 8 * n + 6
    ifd = res + 16
    tags = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, bps), (259, 3, 1, 8), (262, 3, 1, 2),
            (277, 3, 1, 3), (282, 5, 1, res), (283, 5, 1, res + 8), (284, 3, 1, 1), (296, 3, 1, 3),
            (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, offs), (325, 4, n, offs + 4 * n)]
    with open(path, "wb") as f:
        f.write(b"II" + struct.pack("<HI", 42, ifd) + data)
        f.write(struct.pack(f"<{n}I", *[8] * n) + struct.pack(f"<{n}I", *[len(data)] * n))
        f.write(struct.pack("<3H4I", 8, 8, 8, 20000, 1, 20000, 1) + struct.pack("<H", len(tags)))
        for tag, typ, cnt, val in tags:
            f.write(struct.pack("<HHIHH", tag, typ, cnt, val, 0) if typ == 3 and cnt == 1 else struct.pack("<HHII", tag, typ, cnt, val))
        f.write(struct.pack("<I", 0))
    return path


def test_forged_size_is_refused_at_once(tmp_path):
    p = forged_tiff(tmp_path / "forged.tif")
    assert p.stat().st_size < 100_000
    with pytest.raises(SlideError, match=r"^forged\.tif: declares 200,000 x 200,000 px in [\d,]+ bytes .* forged or damaged"):
        open_slide(p)
    r = cli("tile", str(p), "--out", str(tmp_path / "f.zarr"), timeout=120)
    assert r.returncode == 2 and "forged.tif: declares" in one_error_line(r)
    for name in ("CMU-1-Small-Region.svs", "small.svs"):  # real slides pass the bound
        open_slide(shared_slide(name)).close()


# --------------------------------------------------------------------------- 9. clear one-line errors


@pytest.mark.parametrize("content, why", [(b"", "the file is empty"), (b"not weights\n", "not a PyTorch or safetensors checkpoint")])
def test_bad_weights_file_is_one_line(small, tmp_path, content, why):
    d, _ = small
    w = tmp_path / "w.pth"
    w.write_bytes(content)
    from pipeline.features.encoders import build_encoder

    with pytest.raises(ConfigError, match=f"^weights file {w}: {why}"):
        build_encoder(ENC, w)
    r = cli("extract", str(d / "s.zarr"), "--encoder", ENC, "--weights", str(w), "--out", str(tmp_path / "f.zarr"))
    assert r.returncode == 2 and f"weights file {w}: {why}" in one_error_line(r)


def test_tiling_options_agree_with_the_schema():
    """Every value the config schema refuses for a `tiling` option, TilingConfig refuses too, with
    one line naming the option (and the reverse), so `--tiling` JSON is checked like config.yaml."""
    import jsonschema
    import yaml
    from conftest import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    tiling = schema["properties"]["tiling"]
    probes = [-1, 0, 0.5, 1, 2.0, 16, 100, 255, 256, 4096, 5000, 65536, "abc", True, [1], {"a": 1}]
    checked = 0
    for name in tiling["properties"]:
        for v in probes + ([{"20x": 0.5}, {"20x": 0}, {"20x": "x"}, {}] if name == "magnifications" else []):
            schema_ok = jsonschema.Draft202012Validator(tiling).is_valid({name: v})
            try:
                TilingConfig.from_dict({name: v})
                ours = True
            except ConfigError as e:
                assert "\n" not in str(e) and f"tiling.{name}" in str(e) or name == "magnifications", str(e)
                ours = False
            assert ours == schema_ok, f"tiling.{name} = {v!r}: schema {'accepts' if schema_ok else 'refuses'} it"
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("tiling, msg", [('{"tile_size": "abc"}', "tiling.tile_size must be an integer, got 'abc'"),
                                         ('{"tile_size": -1}', "tiling.tile_size must be >= 16, got -1"),
                                         ('{"mask_mpp": 0}', "tiling.mask_mpp must be > 0, got 0"),
                                         ("abc", "--tiling: not valid JSON")])
def test_cli_tiling_values_are_one_line_errors(cmu, tmp_path, tiling, msg):
    r = cli("tile", str(cmu), "--out", str(tmp_path / "x.zarr"), "--tiling", tiling)
    assert r.returncode == 2 and msg in one_error_line(r)


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--sheet", str(tmp_path / "s.tsv"), "--splits", str(tmp_path / "sp.tsv"), "--fold", "fold_0",
            "--out", str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("case", ["sheet", "model", "features", "model key", "input file", "run"])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, case):
    """Bad input of every kind (sheet, option, config, missing file, trained run): exit 2 and
    one `error:` line naming the file or option, never a traceback nor the exit 1 of a crash."""
    from pipeline.cli import main

    argv, msg = {
        "sheet": (["splits", "--sheet", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "sp.tsv")],
                  "slide sheet"),
        "model": (_train_args(tmp_path, "--model", "nope", "--features", "20x=f"), "--model 'nope': unknown model"),
        "features": (_train_args(tmp_path, "--model", "abmil_3", "--features", "20x"), "--features expects MAG=DIR"),
        "model key": (_train_args(tmp_path, "--model", "abmil_3", "--features", "20x=f", "--training",
                                  '{"model": {"n_group": 4}}'), "unknown model config key(s) ['n_group']"),
        "input file": (["heatmaps", "--fold-dir", str(tmp_path / "fold"), "--tiles-dir", str(tmp_path),
                        "--out", str(tmp_path / "h")], "attention.npz: file not found"),
        "run": (["predict", "--run", str(tmp_path / "run"), "--sheet", str(tmp_path / "s.tsv"),
                 "--results", str(tmp_path)], "trained run"),
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err


@pytest.mark.parametrize("text, msg", [
    ("slide_id\tpath\tlabel\tlabel\tpatient_id\ns1\ta.svs\tx\ty\tp1\n", r"column\(s\) \['label'\] appear more than once"),
    ("slide_id\tpath\tlabel\tpatient_id\ns1\ta.svs\tx\tp1\ts2\tb.svs\n", r"row 2: 6 or more cells, the header has 4 columns"),
])
def test_sheet_duplicate_columns_and_extra_cells_are_refused(tmp_path, text, msg):
    with pytest.raises(SheetError, match=msg):
        parse_sheet(text, tmp_path, check_files=False)
    assert parse_sheet("slide_id\tpath\tlabel\tpatient_id\ns1\ta.svs\tx\tp1\t\t\n", tmp_path, check_files=False)  # empty ones: fine


def test_failed_status_without_error_fails_verify(small, tmp_path, capsys):
    from pipeline.cli import main

    f = _copy_store(small, tmp_path / "features" / ENC)
    meta = json.loads((f / "zarr.json").read_text())
    meta["attributes"]["status"] = "failed"
    (f / "zarr.json").write_text(json.dumps(meta))
    assert main(["verify", str(f)]) == 1
    assert "broken: status 'failed' but no error recorded" in capsys.readouterr().out


# --------------------------------------------------------------------------- 6 + 9. the workflow refuses before any job


@pytest.mark.integration
@pytest.mark.parametrize("case, extra, msg", [
    ("folds", "", "SheetError: slide sheet: 3 patient(s), fewer than the 5 folds"),
    ("model key", "splits: {folds: 2}\ntraining: {model: {n_group: 4}}\n", "config training.model: unknown model config key(s) ['n_group']"),
])
def test_workflow_refuses_before_any_job(tmp_path, case, extra, msg):
    from conftest import snakemake_cmd, venv_env, write_cohort

    labels = ["a", "b", "a"]
    slides = [shared_slide(n) for n in ("CMU-1-Small-Region.svs", "small.svs", "boxes.tiff")]
    write_cohort(tmp_path, [(f"s{i}", p, lab) for i, (p, lab) in enumerate(zip(slides, labels))], extra)

    def run(*args):
        return subprocess.run(snakemake_cmd(tmp_path, *args, cores=1), capture_output=True, text=True, cwd=tmp_path,
                              env=venv_env())

    r = run() if case == "folds" else run("-n")  # a real run: refused while building the DAG, no job started
    assert r.returncode != 0 and msg in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert not (tmp_path / "results").exists()
    if case == "folds":  # tiling alone does not need folds
        r = run("-n", "tiles")
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]


def test_config_schema_refuses_unknown_top_level_keys():
    import jsonschema
    import yaml
    from conftest import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    jsonschema.validate({"cohort": "c", "slides": "s.tsv"}, schema)
    with pytest.raises(jsonschema.ValidationError, match="'trainig' was unexpected"):
        jsonschema.validate({"cohort": "c", "slides": "s.tsv", "trainig": {"epochs": 2}}, schema)


def test_integrity_bench_prints_its_ratios(tmp_path, capsys):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_integrity", REPO / "bench" / "integrity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--gb", "0.01", "--dir", str(tmp_path), "--rows", "300", "--dim", "16"]) == 0
    ratios = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ratio ")]
    assert len(ratios) == 6 and all(float(ln.rsplit(": ", 1)[1]) > 0 for ln in ratios)
    assert list(tmp_path.iterdir()) == []  # the big file is gone
