"""Read-only inspection of a store's arrays (metadata, whole arrays, row chunks), for `verify`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import one_line
from pipeline.store import zarr_io
from pipeline.store.contract import CHUNK_INTEGRITY, read_attrs


@dataclass(frozen=True)
class ArrayInfo:
    name: str  # "<mag>/<array>", e.g. "20x/coords"
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]


def list_arrays(path: str | Path) -> dict[str, ArrayInfo]:
    """Every array of a store by "<group>/<name>", with shape, dtype and chunk shape (metadata only)."""
    root = zarr.open_group(str(path), mode="r")
    out = {}
    with warnings.catch_warnings():  # Snakemake's `.snakemake_timestamp` in directory outputs
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        members = list(root.members(max_depth=None))
    for name, node in members:
        if isinstance(node, zarr.Array):
            out[name] = ArrayInfo(name, tuple(int(v) for v in node.shape), np.dtype(node.dtype),
                                  tuple(int(v) for v in node.chunks))
    return out


def read_array(path: str | Path, name: str) -> np.ndarray:
    """The whole array `name` ("<mag>/<array>") of a store."""
    return zarr_io.read_array(Path(path) / name)


def iter_array_rows(path: str | Path, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) of the array `name`, one chunk of rows at a time (bounded memory)."""
    arr = zarr.open_group(str(path), mode="r")[name]
    step = max(1, int(arr.chunks[0]))
    for start in range(0, int(arr.shape[0]), step):
        yield start, np.asarray(arr[start : start + step])




def chunk_problems(path: str | Path) -> list[str]:
    """One line per array of a feature store whose chunks fail their checksum, cannot be decoded
    or (stores written with every chunk) are missing; [] when all are sound or not checkable."""
    path = Path(path)
    attrs = read_attrs(path)
    strict = attrs.get("chunk_integrity") == CHUNK_INTEGRITY
    problems = []
    for name in list_arrays(path):
        try:
            zarr_io.read_array(path / name, require_chunks=strict)
        except (OSError, ValueError) as e:
            problems.append(f"{name}: {one_line(e).replace(str(path / name) + '/', '')}")
    return problems


