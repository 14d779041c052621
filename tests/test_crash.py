"""kill -9 at many points of every stage, then a rerun: results identical to an uninterrupted run.

Two kinds of kill points:
- timed: `python -m pipeline <stage>` gets SIGKILL after a fraction of the measured duration of
  an uninterrupted run (lands wherever the process happens to be: imports, compute, writes);
- injected: the same command run through a small driver (tests/killpoints.py) that wraps one function and SIGKILLs its
  own process right before / after the n-th matching call, or after writing only half of the
  file it was writing ("truncate"): the exact moments where a non-atomic write would show.
After every kill the final outputs must be absent or whole (equal to the reference); after the
rerun they must equal the reference byte for byte (tensors of `checkpoint.pt` compared loaded).
Each test prints its table of kill points (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import digest, tissue_image, write_tiff
from killpoints import run_killed

from pipeline.config import TilingConfig
from pipeline.store import FeatureStoreMeta, FeatureStoreWriter, TileSet, tiles_digest
from pipeline.tiling.stage import tile_to_store
from pipeline.verify import verify_results

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}  # same threads, same floats


def pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV)


def injected(spec: str, *args: str) -> int:
    return run_killed(spec, *args, env=ENV).returncode


def timed(delay: float, *args: str) -> str:
    p = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ENV)
    try:
        p.wait(timeout=delay)
        return "finished before the kill"
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        return "killed"


def measured(*args: str) -> float:
    t0 = time.perf_counter()
    r = pipeline(*args)
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - t0


def state(path: Path, ref: Path) -> str:
    if not path.exists():
        return "absent"
    return "whole (= reference)" if digest(path) == digest(ref) else "DIFFERENT"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name or p.name.endswith(".partial"))


def print_table(stage: str, rows: list[tuple[str, ...]]) -> None:
    print(f"\n{stage}: kill point | outcome | on disk after the kill")
    for r in rows:
        print("  " + " | ".join(r))


# --------------------------------------------------------------------------- tiling


def test_tile_kill9_then_rerun_is_identical(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(2400, 2400, seed=3, blobs=5), mpp=0.5, levels=3)

    def args(d: Path) -> list[str]:
        return ["tile", str(slide), "--out", str(d / "s.zarr"), "--tiling", '{"tile_size": 64}',
                "--qc", str(d / "s.png"), "--mask", str(d / "s.mask.png")]

    ref, out = tmp_path / "ref", tmp_path / "out"
    duration = measured(*args(ref))
    outputs = ("s.zarr", "s.png", "s.mask.png")

    def on_disk() -> str:
        return ", ".join(f"{o} {state(out / o, ref / o)}" for o in outputs) + (f"; leftovers {leftovers(out)}" if out.exists() and leftovers(out) else "")

    rows = []
    for frac in (0.4, 0.7, 0.9):
        outcome = timed(frac * duration, *args(out))
        rows.append((f"timed {frac:.2f} x {duration:.1f} s", outcome, on_disk()))
        assert state(out / "s.zarr", ref / "s.zarr") != "DIFFERENT"
    points = [
        ("zarr:Group.create_array:7:before", "7th array of the temporary store being created"),
        ("pipeline.store.tiles:replace_dir:1:before", "temporary store complete, not renamed yet"),
        (None, "(a complete run)"),
        ("os:replace[.old-]:1:after", "replacing an existing store: old one moved aside, new not in place"),
        ("pipeline.tiling.stage:write_mask_png:1:truncate", "store in place, mask PNG half-written"),
        ("pipeline.tiling.stage:write_png:1:before", "store and mask in place, QC PNG not written"),
    ]
    for spec, what in points:
        if spec is None:
            assert pipeline(*args(out)).returncode == 0
            continue
        injected(spec, *args(out))
        rows.append((f"{what} [{spec}]", "killed", on_disk()))
        assert state(out / "s.zarr", ref / "s.zarr") != "DIFFERENT", rows[-1]
    r = pipeline(*args(out))
    assert r.returncode == 0, r.stderr
    rows.append(("rerun", "exit 0", on_disk()))
    print_table("tile", rows)
    for o in outputs:
        assert digest(out / o) == digest(ref / o), o
    assert leftovers(out) == []  # temporary directories of the killed runs were cleaned up
    assert verify_results([out / "s.zarr"]) == []


# --------------------------------------------------------------------------- extraction
# (test_extract.py kills `extract` right after committed chunks; this adds a kill inside a chunk write.)


@pytest.mark.slow
def test_extract_kill9_inside_a_chunk_write(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(896, 768, seed=10, blobs=4), mpp=0.5, levels=2)
    tile_to_store(slide, tmp_path / "t.zarr", TilingConfig(tile_size=64))
    args = ["extract", str(tmp_path / "t.zarr"), "--encoder", "resnet18_simclr", "--workers", "0", "--batch-size", "2"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    assert pipeline(*args, "--out", str(ref)).returncode == 0
    # chunks are 32 rows: kill while zarr puts the 2nd chunk of 20x features in place
    injected("pathlib:Path.replace[/20x/features/c/]:2:before", *args, "--out", str(out))
    partial = out.with_name(out.name + ".partial")
    rows = [("inside the 2nd chunk write of 20x/features [pathlib:Path.replace[/20x/features/c/]:2:before]", "killed",
             f"out.zarr {state(out, ref)}, .partial holds {len(list(partial.rglob('*')))} paths, progress "
             f"{json.loads((partial / 'progress.json').read_text())}")]
    assert not out.exists()
    r = pipeline(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows.append(("rerun (resumes after the 1st chunk)", "exit 0", f"out.zarr {state(out, ref)}"))
    print_table("extract", rows)
    assert digest(out) == digest(ref)
    assert not partial.exists()


# --------------------------------------------------------------------------- training and evaluation

MAGS = ("20x", "10x", "5x")


def _tiles(n_regions: int) -> dict[str, TileSet]:
    out = {}
    for i, m in enumerate(MAGS):
        per = 4 ** (2 - i)  # tiles per region at this magnification
        r, k = np.divmod(np.arange(n_regions * per), per)
        out[m] = TileSet(coords=np.stack([k * 64 * 2**i, r * 256], 1).astype(np.int64),
                         grid=np.zeros((len(r), 2), np.int32), tissue=np.ones(len(r), np.float32),
                         region=r.astype(np.int32), parent=np.full(len(r), -1, np.int64))
    return out


def feature_cohort(d: Path, n: int = 12, dim: int = 16) -> tuple[Path, Path]:
    """A sheet and feature stores (random features, label-shifted) written through the store API."""
    rng = np.random.default_rng(0)
    fdir = d / "features" / "synthetic"
    rows = ["slide_id\tpath\tlabel\tpatient_id"]
    for i in range(n):
        sid = f"s{i:02d}"
        tiles = _tiles(int(rng.integers(2, 5)))
        w = FeatureStoreWriter(fdir / f"{sid}.zarr", tiles, {m: dim for m in MAGS},
                               FeatureStoreMeta(slide_id=sid, tiles_sha256=tiles_digest(tiles), encoder="synthetic"))
        for m, ts in tiles.items():
            w.write(m, 0, rng.normal(0.8 * (i % 2), 1.0, (len(ts), dim)), np.zeros(len(ts), bool))
        w.finalize()
        rows.append(f"{sid}\t{sid}.tif\t{'tumor' if i % 2 else 'normal'}\tp{i}")
    (d / "slides.tsv").write_text("\n".join(rows) + "\n")
    return d / "slides.tsv", fdir


def _load(ckpt: Path) -> dict:
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=False)


def _same_checkpoint(a: dict, b: dict) -> bool:
    import torch

    sa, sb = a["state_dict"], b["state_dict"]
    if list(sa) != list(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
        return False
    rest = lambda c: {k: v for k, v in c.items() if k != "state_dict"}  # noqa: E731
    return json.dumps(rest(a), sort_keys=True, default=str) == json.dumps(rest(b), sort_keys=True, default=str)


@pytest.mark.slow
def test_train_and_evaluate_kill9_then_rerun_is_identical(tmp_path):
    sheet, fdir = feature_cohort(tmp_path)
    assert pipeline("splits", "--sheet", str(sheet), "--out", str(tmp_path / "splits.tsv"), "--folds", "2").returncode == 0
    common = ["--sheet", str(sheet), "--splits", str(tmp_path / "splits.tsv"), "--fold", "fold_0",
              *[f"--features={m}={fdir}" for m in MAGS]]

    def train(d: Path) -> list[str]:
        return ["train", *common, "--model", "abmil_3", "--training", '{"epochs": 3, "min_epochs": 1}', "--out", str(d)]

    ref, out = tmp_path / "ref", tmp_path / "out"
    duration = measured(*train(ref))
    want = _load(ref / "checkpoint.pt")

    def ckpt_state() -> str:
        p = out / "checkpoint.pt"
        if not p.exists():
            return "absent"
        try:
            return "whole (= reference)" if _same_checkpoint(_load(p), want) else "DIFFERENT"
        except Exception as e:  # a half-written checkpoint taken for a finished one
            return f"UNREADABLE ({type(e).__name__})"

    def on_disk() -> str:
        extra = [f"history.tsv {state(out / 'history.tsv', ref / 'history.tsv')}"] if out.exists() else []
        tmp = [p.name for p in out.glob("*.tmp")] if out.exists() else []
        return ", ".join([f"checkpoint.pt {ckpt_state()}", *extra] + ([f"leftovers {tmp}"] if tmp else []))

    rows = []
    for frac in (0.35, 0.7):
        rows.append((f"timed {frac:.2f} x {duration:.1f} s", timed(frac * duration, *train(out)), on_disk()))
        assert ckpt_state() in ("absent", "whole (= reference)"), rows[-1]
        shutil.rmtree(out, ignore_errors=True)
    for spec, what in [("pandas:DataFrame.to_csv[history]:1:truncate", "history.tsv's temporary file half-written"),
                       ("torch:save:1:truncate", "checkpoint.pt's temporary file half-written")]:
        injected(spec, *train(out))
        rows.append((f"{what} [{spec}]", "killed", on_disk()))
        assert ckpt_state() in ("absent", "whole (= reference)"), rows[-1]
        assert state(out / "history.tsv", ref / "history.tsv") in ("absent", "whole (= reference)"), rows[-1]
    r = pipeline(*train(out))
    assert r.returncode == 0, r.stderr
    rows.append(("rerun", "exit 0", on_disk()))
    assert ckpt_state() == "whole (= reference)"
    assert digest(out / "history.tsv") == digest(ref / "history.tsv")
    # the same checkpoint, being rewritten by a rerun, stays whole at every kill
    injected("torch:save:1:truncate", *train(out))
    rows.append(("rerun over a finished checkpoint, checkpoint.pt.tmp half-written [torch:save:1:truncate]", "killed", on_disk()))
    assert ckpt_state() == "whole (= reference)"
    print_table("train", rows)

    def evaluate(d: Path) -> list[str]:
        return ["evaluate", *common, "--checkpoint", str(ref / "checkpoint.pt"), "--out", str(d)]

    outputs = ("metrics.json", "predictions.csv")
    duration = measured(*evaluate(ref))

    def eval_state() -> str:
        return ", ".join(f"{o} {state(out / o, ref / o)}" for o in outputs)

    rows = []
    shutil.rmtree(out)
    rows.append((f"timed 0.80 x {duration:.1f} s", timed(0.8 * duration, *evaluate(out)), eval_state()))
    for spec, what in [("pandas:DataFrame.to_csv[predictions]:1:after", "predictions.csv written, metrics.json not"),
                       ("pathlib:Path.write_text[metrics]:1:truncate", "metrics.json's temporary file half-written")]:
        shutil.rmtree(out, ignore_errors=True)
        injected(spec, *evaluate(out))
        rows.append((f"{what} [{spec}]", "killed", eval_state()))
        for o in outputs:  # never a half-written output, and no metrics.json without its predictions
            assert state(out / o, ref / o) in ("absent", "whole (= reference)"), rows[-1]
        assert not (out / "metrics.json").exists() or (out / "predictions.csv").exists(), rows[-1]
    r = pipeline(*evaluate(out))
    assert r.returncode == 0, r.stderr
    rows.append(("rerun", "exit 0", eval_state()))
    print_table("evaluate", rows)
    for o in outputs:
        assert digest(out / o) == digest(ref / o), o
    a, b = np.load(out / "attention.npz"), np.load(ref / "attention.npz")  # zip entries carry timestamps
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
