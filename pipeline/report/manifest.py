"""Run manifest: what produced these results (versions, config and sheet hashes, commit, seeds, weights)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.atomic import write_text

PACKAGES = ("m2otca-pipeline", "torch", "torchvision", "timm", "numpy", "zarr", "openslide-python", "openslide-bin",
            "tifffile", "imagecodecs", "opencv-python-headless", "scikit-learn", "scipy", "snakemake", "pandas")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the resolved config, key order independent."""
    return sha256_bytes(json.dumps(config, sort_keys=True, default=str).encode())


def git_commit(repo: str | Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def build_manifest(config: dict[str, Any], sheet: str | Path, repo: str | Path,
                   weights_sha256: dict[str, str]) -> dict[str, Any]:
    return {
        "pipeline_version": __version__,
        "git_commit": git_commit(repo),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "config_sha256": config_hash(config),
        "sheet": str(sheet),
        "sheet_sha256": sha256_bytes(Path(sheet).read_bytes()),
        "seeds": {"splits": config.get("splits", {}).get("seed"), "training": config.get("training", {}).get("seed")},
        "encoders": config.get("features", {}).get("encoders"),
        "weights_sha256": weights_sha256,
        "config": config,
    }


def write_manifest(out: str | Path, manifest: dict[str, Any]) -> None:
    write_text(out, json.dumps(manifest, indent=2, default=str))
