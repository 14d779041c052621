"""Concurrent runs: two extractions of one slide, two workflow runs on one working directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import snakemake_cmd, tissue_image, venv_env, write_tiff

from pipeline.config import TilingConfig
from pipeline.store import read_feature_store, read_tile_store
from pipeline.tiling.stage import tile_to_store
from pipeline.verify import verify_results

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

ENV = venv_env(OMP_NUM_THREADS="1")


# `python -m pipeline` whose feature writer takes 2 s per committed chunk, as on a big slide: the
# two processes start together but their start-up times vary by seconds on busy machines, and
# the one that gets the lock must still hold it when the other asks.
SLOW_WRITER = """
import sys, time
import pipeline.store as st
write = st.FeatureStoreWriter.write
st.FeatureStoreWriter.write = lambda self, *a: (time.sleep(2.0), write(self, *a))[1]
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_extractions_of_one_slide_one_wins(tmp_path):
    slide = write_tiff(tmp_path / "s.tif", tissue_image(896, 768, seed=10, blobs=4), mpp=0.5, levels=2)
    res = tmp_path / "results" / "c"
    tile_to_store(slide, res / "tiles" / "s.zarr", TilingConfig(tile_size=64))
    out = res / "features" / "resnet18_simclr" / "s.zarr"
    cmd = [sys.executable, "-c", SLOW_WRITER, "extract", str(res / "tiles" / "s.zarr"), "--encoder", "resnet18_simclr",
           "--workers", "0", "--batch-size", "8", "--out", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 75], [(rc, err[-1500:]) for rc, _, err in results]
    loser_err = next(err for rc, _, err in results if rc == 75)
    assert loser_err.strip() == f"error: s.zarr: another process is writing {out}; stopping", loser_err
    winner_err = next(err for rc, _, err in results if rc == 0)
    assert "Traceback" not in winner_err
    # the winner's store is whole, complete and consistent; no partial or lock left behind
    _, feats = read_feature_store(out)
    assert {m: len(f.features) for m, f in feats.items()} == {m: len(t) for m, t in read_tile_store(res / "tiles" / "s.zarr").tiles.items()}
    assert verify_results([tmp_path / "results"]) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.zarr"]


def test_second_workflow_run_on_the_same_folder_is_refused(tmp_path):
    rows = ["slide_id\tpath\tlabel\tpatient_id"]
    for i in range(3):
        write_tiff(tmp_path / f"s{i}.tif", tissue_image(1024, 896, seed=i, blobs=3), mpp=0.5, levels=2)
        rows.append(f"s{i}\ts{i}.tif\t{'ab'[i % 2]}\tp{i}")
    (tmp_path / "slides.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "config.yaml").write_text(f"cohort: tiny\nslides: {tmp_path / 'slides.tsv'}\ndemo: {{enabled: false}}\n"
                                          "tiling: {tile_size: 64}\n")
    first = subprocess.Popen(snakemake_cmd(tmp_path, "tiles_summary"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=tmp_path, env=ENV)
    locks = tmp_path / ".snakemake" / "locks"
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (locks.exists() and any(locks.iterdir())):
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before it was seen holding its lock:\n" + first.communicate()[0][-3000:]
    os.kill(first.pid, signal.SIGSTOP)  # hold the first run mid-way (its jobs go on), lock held
    try:
        # as the default profile runs it (rerun-incomplete): refused by the lock
        second = subprocess.run(snakemake_cmd(tmp_path, "tiles_summary", "--rerun-incomplete"),
                                capture_output=True, text=True, cwd=tmp_path, env=ENV)
        # plain: refused earlier, because the first run's jobs are marked incomplete
        plain = subprocess.run(snakemake_cmd(tmp_path, "tiles_summary"), capture_output=True, text=True, cwd=tmp_path, env=ENV)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out = second.stdout + second.stderr
    print(f"\nsecond run (exit {second.returncode}):\n" + out[out.find("Error: Directory cannot be locked"):].strip()[:1000])
    assert second.returncode == 1, out[-3000:]
    assert "Error: Directory cannot be locked" in out and "--unlock" in out, out[-3000:]
    out = plain.stdout + plain.stderr
    assert plain.returncode == 1 and ("Directory cannot be locked" in out or "IncompleteFilesException" in out), out[-3000:]
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log[-3000:]
    assert not locks.exists() or not any(locks.iterdir())  # released
    res = tmp_path / "results" / "tiny"
    assert sorted(p.name for p in (res / "tiles").glob("*.zarr")) == ["s0.zarr", "s1.zarr", "s2.zarr"]
    assert verify_results([tmp_path / "results"]) == []
