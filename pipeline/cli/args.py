"""Argument values that commands of several stages parse alike (`_names`, `_features_arg`)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import ConfigError


def _names(csv: str) -> list[str]:
    return [v for v in csv.split(",") if v]


def _features_arg(values: list[str]) -> dict[str, Path]:
    out = {}
    for v in values:
        mag, _, d = v.partition("=")
        if not d:
            raise ConfigError(f"--features expects MAG=DIR, got {v!r}")
        out[mag] = Path(d)
    return out
