"""Shared fixtures. Real public slides come from ../shared/slides through `shared_slide` only."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("PIPELINE_SHARED_SLIDES", REPO.parent / "shared" / "slides"))

# The Snakemake SLURM plugin runs `scontrol show config` whenever Snakemake starts (for an option's
# help text); with Slurm's client installed (CI installs it for test_slurm.py) and no controller up,
# that waits ~9-10 s per Snakemake process. An empty config makes scontrol fail at once. Only
# test_slurm.py talks to SLURM, and it strips every SLURM_* variable (slurm_cluster.clean_env).
os.environ.setdefault("SLURM_CONF", os.devnull)


def shared_slide(name: str) -> Path:
    """Path of a slide in ../shared/slides; skips locally, fails loudly in CI when missing."""
    p = SHARED_SLIDES / name
    if not p.exists():
        msg = f"shared test slide missing: {p} (tests expect ../shared/slides beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@pytest.fixture
def cmu() -> Path:
    return shared_slide("CMU-1-Small-Region.svs")


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder (by relative path)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def venv_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: os.environ) plus `extra`, with this interpreter's bin folder first on PATH."""
    env = {**(os.environ if base is None else base), **extra}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def snakemake_cmd(workdir: Path, *args: str, cores: int | None = 2, repo: Path = REPO) -> list[str]:
    """`python -m snakemake` on the repo's Snakefile in `workdir` with its config.yaml, then `args`;
    `cores=None` leaves out `--cores` (the SLURM test's profile runs with --jobs); `repo`: a copy."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(workdir),
           "--configfile", str(workdir / "config.yaml")]
    if cores is not None:
        cmd += ["--cores", str(cores)]
    return [*cmd, *args]


def write_cohort(tmp: Path, rows: list[tuple[str, Path, str]], extra: str = "") -> None:
    """`tmp`/slides.tsv (patient p<i>, mpp left empty) and a config.yaml using it, `extra` appended."""
    lines = ["slide_id\tpath\tlabel\tpatient_id\tmpp"] + [f"{sid}\t{p}\t{lab}\tp{i}\t" for i, (sid, p, lab) in enumerate(rows)]
    (tmp / "slides.tsv").write_text("\n".join(lines) + "\n")
    (tmp / "config.yaml").write_text(f"cohort: tiny\nslides: {tmp / 'slides.tsv'}\ndemo: {{enabled: false}}\n" + extra)


def write_tiff(path: Path, img: np.ndarray, mpp: float | None = 0.5, tiled: bool = True, levels: int = 1, **kw) -> Path:
    """A small (pyramidal) RGB TIFF written with tifffile; `tiled=False` makes a stripped one."""
    import cv2
    import tifffile

    opts = dict(photometric="rgb", compression="jpeg" if tiled else None, **kw)
    if tiled:
        opts["tile"] = (64, 64)
    else:
        opts["rowsperstrip"] = 16
    if mpp is not None:
        opts.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, **opts)
        for i in range(1, levels if tiled else 1):
            small = cv2.resize(img, (img.shape[1] >> i, img.shape[0] >> i), interpolation=cv2.INTER_AREA)
            tw.write(small, subfiletype=1, **{k: v for k, v in opts.items() if k not in ("resolution", "resolutionunit")})
    return path


def tissue_image(h: int, w: int, seed: int = 0, blobs: int = 3) -> np.ndarray:
    """White background with a few pink/purple blobs of 'tissue' (deterministic)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    for _ in range(blobs):
        c = (int(rng.integers(w // 5, 4 * w // 5)), int(rng.integers(h // 5, 4 * h // 5)))
        axes = (int(rng.integers(w // 10, w // 4)), int(rng.integers(h // 10, h // 4)))
        cv2.ellipse(img, c, axes, float(rng.integers(0, 180)), 0, 360, (200, 110, 170), -1)
    noise = rng.integers(-12, 12, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)
