"""The Snakemake workflow on a tiny cohort of real and broken slides (no --keep-going needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, shared_slide, snakemake_cmd, venv_env, write_cohort

pytestmark = pytest.mark.integration


def snakemake(workdir: Path, *args: str, repo: Path = REPO) -> subprocess.CompletedProcess:
    """Run the workflow of `repo` (a copy: its own package too) in `workdir`, with 4 job slots on
    2 CPUs: these tiny jobs mostly wait on imports (one core each)."""
    env = venv_env() if repo == REPO else venv_env(PYTHONPATH=str(repo))
    return subprocess.run(snakemake_cmd(workdir, *args, cores=4, repo=repo), capture_output=True, text=True, cwd=workdir,
                          env=env)


def copy_repo(dst: Path) -> Path:
    """The workflow and its package copied to `dst`, so a test may edit their code."""
    dst.mkdir(parents=True)
    for name in ("Snakefile", "workflow", "pipeline", "envs", "pyproject.toml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def test_tiling_workflow_survives_bad_slides_and_is_incremental(tmp_path):
    rows = [("cmu", shared_slide("CMU-1-Small-Region.svs"), "tumor"),
            ("boxes", shared_slide("boxes.tiff"), "normal"),
            ("unreadable", shared_slide("broken/unreadable.svs"), "normal")]
    write_cohort(tmp_path, rows)
    r = snakemake(tmp_path, "tiles_summary")
    assert r.returncode == 0, r.stderr[-3000:]
    res = tmp_path / "results" / "tiny"
    summary = pd.read_csv(res / "tiles" / "summary.tsv", sep="\t").set_index("slide_id")
    failed = summary[summary["status"] == "failed"]
    assert sorted(failed.index) == ["boxes", "unreadable"]
    assert failed.loc["boxes", "error"].startswith("boxes.tiff: magnification unknown")
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
    assert jobs_of(out).get("tile_slide") == 1, out


def jobs_of(out: str) -> dict[str, int]:
    """Rule -> job count from `snakemake -n --quiet rules` output."""
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.slow
def test_features_and_models_rerun_only_what_changed(tmp_path):
    """Add a slide -> its tiling + extraction + training; new encoder -> no tiling; no change -> nothing;
    changed code -> the stages that run it and what follows them. Run from a copy of the repository
    (its code is edited) in a folder whose name holds a quote and a space (every argument is quoted)."""
    from conftest import tissue_image, write_tiff

    repo = copy_repo(tmp_path / "repo")
    work = tmp_path / "o'brien lab"
    work.mkdir()
    slides = []
    for i in range(5):
        p = write_tiff(tmp_path / f"s{i}.tif", tissue_image(900, 1100, seed=i, blobs=4), mpp=0.5, levels=2)
        slides.append((f"s{i}", p, "tumor" if i % 2 else "normal"))
    extra = ("splits: {folds: 2}\nmodels: [abmil_3]\ntraining: {epochs: 2, min_epochs: 1, model: {n_groups: 4}}\n"
             "tiling: {tile_size: 64}\nfeatures: {batch_size: 16}\nheatmaps: {n_auto: 1, model: abmil_3}\n")
    write_cohort(work, slides[:4], extra)
    r = snakemake(work, repo=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    res = work / "results" / "tiny"
    assert (res / "metrics" / "resnet18_simclr" / "summary.tsv").exists()
    assert (res / "metrics" / "resnet18_simclr" / "manifest.json").exists()
    assert "Nothing to be done" in (r2 := snakemake(work, "-n", repo=repo)).stdout + r2.stderr
    # changed extraction code: extraction, then training and evaluation again; never tiling
    encoders = repo / "pipeline" / "features" / "encoders.py"
    original = encoders.read_text()
    encoders.write_text(original + "\n_CHANGED = 1\n")
    out = (r := snakemake(work, "-n", repo=repo)).stdout + r.stderr
    assert "Params have changed since last execution" in out, out[-3000:]
    jobs = jobs_of((r := snakemake(work, "-n", "--quiet", "rules", repo=repo)).stdout + r.stderr)
    assert "tile_slide" not in jobs and jobs.get("extract_features") == 4, jobs
    assert jobs.get("train_mil") == 2 and jobs.get("evaluate_mil") == 2, jobs
    encoders.write_text(original)
    # changed training code: training and what follows it only
    train = repo / "pipeline" / "mil" / "train.py"
    original = train.read_text()
    train.write_text(original + "\n_CHANGED = 1\n")
    jobs = jobs_of((r := snakemake(work, "-n", "--quiet", "rules", repo=repo)).stdout + r.stderr)
    assert jobs.get("train_mil") == 2 and jobs.get("evaluate_mil") == 2, jobs
    assert not {"tile_slide", "extract_features", "make_splits"} & set(jobs), jobs
    train.write_text("# a comment changes nothing\n" + original)
    assert "Nothing to be done" in (r2 := snakemake(work, "-n", repo=repo)).stdout + r2.stderr
    # one more slide: only its tiling and extraction, then splits/training/evaluation again
    write_cohort(work, slides, extra)
    jobs = jobs_of((r := snakemake(work, "-n", "--quiet", "rules", repo=repo)).stdout + r.stderr)
    assert jobs.get("tile_slide") == 1 and jobs.get("extract_features") == 1, jobs
    assert jobs.get("train_mil", 0) >= 1 and jobs.get("evaluate_mil", 0) >= 1, jobs
    # another encoder for every magnification: features and models, never tiles
    write_cohort(work, slides[:4], extra.replace(
        "features: {batch_size: 16}",
        'features: {batch_size: 16, encoders: {"20x": "timm:resnet10t", "10x": "timm:resnet10t", "5x": "timm:resnet10t"}}'))
    jobs = jobs_of((r := snakemake(work, "-n", "--quiet", "rules", repo=repo)).stdout + r.stderr)
    assert "tile_slide" not in jobs and jobs.get("extract_features") == 4, jobs


def test_lint_and_format_clean(tmp_path):
    """`snakemake --lint` finds nothing and snakefmt would change nothing."""
    write_cohort(tmp_path, [("cmu", shared_slide("CMU-1-Small-Region.svs"), "tumor")])
    r = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", str(tmp_path / "config.yaml")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
