"""Tile stores: `tiles/<slide_id>.zarr`, one group per magnification with the TILE_ARRAYS."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.store import zarr_io
from pipeline.store.contract import TILE_ARRAYS, TileSet, TileStoreMeta, read_tile_meta
from pipeline.store.lifecycle import replace_dir, tmp_path


def write_tile_store(path: str | Path, tiles: dict[str, TileSet], meta: TileStoreMeta) -> None:
    """Write a complete tile store atomically (temporary name, then rename); the writer fills in
    the magnifications, tile counts and the tiles' digest."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name, ts in tiles.items():
        n = len(ts)
        for key, spec in TILE_ARRAYS.items():
            data = np.asarray(getattr(ts, key), dtype=spec.dtype)
            chunks = (max(n, 1),) + data.shape[1:]
            arr = root.create_array(f"{name}/{key}", shape=data.shape, dtype=spec.dtype, chunks=chunks)
            if n:
                arr[...] = data
    root.attrs.update(meta.with_tiles(tiles).to_attrs())
    replace_dir(tmp, final)


@dataclass
class TileStore:
    meta: TileStoreMeta
    tiles: dict[str, TileSet]  # magnification -> tiles, finest first


def read_tile_store(path: str | Path) -> TileStore:
    """Read a finished tile store; a failed one raises its recorded SlideError."""
    path = Path(path)
    meta = read_tile_meta(path)
    tiles = {name: TileSet(**{k: np.asarray(zarr_io.read_array(path / name / k), dtype=spec.dtype)
                              for k, spec in TILE_ARRAYS.items()})
             for name in meta.magnifications}
    return TileStore(meta=meta, tiles=tiles)
