"""Cohort tables from store attributes: tiles per slide and magnification, and failed slides."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.atomic import write_tsv
from pipeline.store import store_state


def summarize_stores(paths: list[str | Path]) -> pd.DataFrame:
    """One row per store: status, stage, tile counts, resolution and, for failures, the cause."""
    rows = []
    for p in map(Path, paths):
        status, attrs = store_state(p)
        attrs = attrs if status in ("ok", "failed") else {}
        row = {
            "slide_id": attrs.get("slide_id", p.name.removesuffix(".zarr")),
            "stage": attrs.get("kind", "?"),
            "status": status,
            "base_mpp": attrs.get("base_mpp"),
            "mpp_source": attrs.get("mpp_source"),
            "vendor": attrs.get("vendor"),
            "error": attrs.get("error", "" if status == "ok" else f"store is {status}: {p}"),
        }
        for mag, n in (attrs.get("n_tiles") or {}).items():
            row[f"tiles_{mag}"] = n
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in [c for c in df.columns if c.startswith("tiles_")]:
        df[col] = df[col].astype("Int64")
    return df


def write_summary(paths: list[str | Path], table: str | Path, failed: str | Path | None = None) -> pd.DataFrame:
    """Write the per-slide table and, optionally, the failed-slides table (TSV)."""
    df = summarize_stores(paths)
    write_tsv(table, df)
    if failed is not None:
        bad = df[df["status"] != "ok"][["slide_id", "stage", "error"]] if len(df) else df
        bad = bad.drop_duplicates("slide_id", keep="first")  # the earliest stage that failed
        write_tsv(failed, bad)
    return df
