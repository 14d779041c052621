"""The Snakemake workflow on a tiny cohort of real and broken slides (no --keep-going needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, shared_slide

pytestmark = pytest.mark.integration


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env)


def write_cohort(tmp: Path, rows: list[tuple[str, Path, str]]) -> None:
    lines = ["slide_id\tpath\tlabel\tpatient_id\tmpp"] + [f"{sid}\t{p}\t{lab}\tp{i}\t" for i, (sid, p, lab) in enumerate(rows)]
    (tmp / "slides.tsv").write_text("\n".join(lines) + "\n")
    (tmp / "config.yaml").write_text(f"cohort: tiny\nslides: {tmp / 'slides.tsv'}\ndemo: {{enabled: false}}\n"
                                     )


def test_tiling_workflow_survives_bad_slides_and_is_incremental(tmp_path):
    rows = [("cmu", shared_slide("CMU-1-Small-Region.svs"), "tumor"),
            ("boxes", shared_slide("boxes.tiff"), "normal"),
            ("unreadable", shared_slide("broken/unreadable.svs"), "normal")]
    write_cohort(tmp_path, rows)
    r = snakemake(tmp_path, "tiles_summary")
    assert r.returncode == 0, r.stderr[-3000:]
    res = tmp_path / "results" / "tiny"
    failed = pd.read_csv(res / "failed_slides.tsv", sep="\t")
    assert sorted(failed["slide_id"]) == ["boxes", "unreadable"]
    assert failed.set_index("slide_id").loc["boxes", "error"].startswith("boxes.tiff: magnification unknown")
    summary = pd.read_csv(res / "tiles" / "summary.tsv", sep="\t").set_index("slide_id")
    assert summary.loc["cmu", "tiles_20x"] > 0 and summary.loc["cmu", "status"] == "ok"
    assert (res / "qc" / "cmu.png").exists() and (res / "qc" / "boxes.png").exists()
    # nothing changed -> nothing to do
    r = snakemake(tmp_path, "tiles_summary", "-n")
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout
    # a new slide -> only its tiling and the summary
    write_cohort(tmp_path, rows + [("small", shared_slide("small.svs"), "normal")])
    r = snakemake(tmp_path, "tiles_summary", "-n", "--quiet", "rules")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "tile_slide" in out and "summarize_tiles" in out
    jobs = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert jobs.get("tile_slide") == 1, out
