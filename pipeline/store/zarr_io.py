"""A lean reader for the Zarr v3 arrays this project writes, with zarr-python as the fallback.

Why: training reads every slide's feature store once per fold, in a background thread that
competes with the training step for the same cores. zarr-python spends ~20 ms of CPU per store
(one event-loop round trip per metadata document and per array, ~29 per store) around ~4 ms of
actual decompression. The arrays here are all of one simple kind — regular chunk grid chunked
along the first axis only, default `c/...` chunk keys, `bytes` (+ optional `zstd` or `blosc`)
codecs, a numeric fill value — and for exactly that kind the spec's decoding is a few lines: read each
chunk file, decompress, copy. Any other array (other codecs, sharding, 2-D chunking) is read by
zarr-python, so the result is always the spec's (tested equal on every array the stores hold).
A trailing `crc32c` codec (feature stores) is checked here too: a changed byte raises
`DamagedChunk` naming the chunk, as does a chunk file that is gone when `require_chunks`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import Zstd, blosc

_ZSTD = Zstd()


class DamagedChunk(ValueError):
    """A chunk that cannot be trusted: checksum mismatch, undecodable or missing; names the file."""


def read_node_meta(path: str | Path) -> dict[str, Any]:
    """The `zarr.json` document of a v3 group or array (raises OSError / ValueError if unreadable)."""
    with open(os.path.join(path, "zarr.json"), "rb") as f:  # os, not pathlib: ~13 documents per slide
        meta = json.loads(f.read())
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise ValueError(f"{path}: not a Zarr v3 node")
    return meta


def _lean_plan(meta: dict[str, Any]) -> tuple[np.dtype, int, str | None, Any, bool] | None:
    """(dtype, rows per chunk, compressor name or None, fill, crc32c) when the array is of the
    simple kind."""
    try:
        shape = tuple(meta["shape"])
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        grid_ok = meta["chunk_grid"]["name"] == "regular" and len(chunks) == len(shape) >= 1
        keys_ok = meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
        codecs = [c["name"] for c in meta["codecs"]]
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        fill = meta["fill_value"]
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    crc = bool(codecs) and codecs[-1] == "crc32c"
    if crc:
        codecs = codecs[:-1]
    simple = (
        grid_ok and keys_ok and chunks[1:] == shape[1:] and codecs[:1] == ["bytes"] and len(codecs) <= 2
        and set(codecs[1:]) <= {"zstd", "blosc"}
        and not meta.get("storage_transformers") and dtype.kind in "biuf"
        and isinstance(fill, (int, float, bool)) and math.isfinite(fill)
    )
    return (dtype, int(chunks[0]), codecs[1] if len(codecs) == 2 else None, fill, crc) if simple else None


def _decode(codec: str | None, raw: bytes | memoryview, dest: np.ndarray) -> None:
    """Decode one chunk's bytes into `dest` (uint8, exactly the chunk's size)."""
    if codec == "zstd":
        _ZSTD.decode(raw, out=dest)
    elif codec == "blosc":  # the Blosc header carries typesize and shuffle; one thread off the main thread
        blosc.decompress(raw, dest)
    else:
        dest[:] = np.frombuffer(raw, dtype=np.uint8)


_CRC32C_RESIDUE = 0x48674BC7  # crc32c(m + crc32c(m) as 4 little-endian bytes), the same for every m


def _unwrap_crc32c(raw: bytes, where: str) -> memoryview:
    """The chunk bytes without their trailing crc32c (little-endian uint32), checked; a view.

    Checked as CRC-32C's residue over the whole chunk, which holds exactly when the trailer is
    the body's checksum: no ~1 MB copy of the body, and google-crc32c releases the GIL on a
    bytes object of >= 1 MiB (a whole feature chunk), which the training step needs."""
    import google_crc32c

    if len(raw) < 4 or google_crc32c.value(raw) != _CRC32C_RESIDUE:
        raise DamagedChunk(f"{where}: checksum mismatch (the chunk's bytes changed on disk)")
    return memoryview(raw)[:-4]


def _missing_chunks(path: Path, meta: dict[str, Any]) -> list[str]:
    """Chunk keys of a regular-grid array with the default key encoding that have no file."""
    shape = [int(v) for v in meta["shape"]]
    chunks = [int(v) for v in meta["chunk_grid"]["configuration"]["chunk_shape"]]
    sep = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
    counts = [math.ceil(s / c) if c else 0 for s, c in zip(shape, chunks)]
    keys = ["c" + "".join(f"{sep}{i}" for i in idx) for idx in np.ndindex(*counts)] if all(counts) else []
    return [k for k in keys if not (path / k).is_file()]


def read_array(path: str | Path, require_chunks: bool = False) -> np.ndarray:
    """The whole array stored at `path` (an array directory of a local Zarr v3 store).

    A chunk never written reads as the fill value, unless `require_chunks` (stores written with
    every chunk present): then a missing chunk raises DamagedChunk, as does a crc32c mismatch.
    """
    path = os.fspath(path)
    meta = read_node_meta(path)
    plan = _lean_plan(meta)
    if plan is None:
        if require_chunks and (gone := _missing_chunks(Path(path), meta)):
            raise DamagedChunk(f"{Path(path) / gone[0]}: chunk missing ({len(gone)} of the array's chunks gone)")
        try:
            return np.asarray(zarr.open_array(str(path), mode="r")[...])
        except (ValueError, RuntimeError) as e:  # checksum or codec errors
            raise DamagedChunk(f"{path}: {' '.join(str(e).split())}") from e
    dtype, rows, codec, fill, crc = plan
    shape = tuple(int(v) for v in meta["shape"])
    out = np.empty(shape, dtype=dtype.newbyteorder("="))
    if out.size == 0:
        return out
    flat = out.reshape(shape[0], -1).view(np.uint8)  # (N, row bytes): chunks decode straight into it
    swap = not dtype.isnative  # stored big-endian on this little-endian machine (or the reverse)
    tail = "/0" * (len(shape) - 1)  # chunk index along the unchunked axes
    base = os.path.join(path, "c")
    for i, start in enumerate(range(0, shape[0], rows)):
        stop = min(start + rows, shape[0])
        key = f"{base}/{i}{tail}"
        try:
            with open(key, "rb") as f:
                raw = f.read()
        except FileNotFoundError:  # never written: all fill value
            if require_chunks:
                raise DamagedChunk(f"{key}: chunk missing (deleted or never written)") from None
            out[start:stop] = fill
            continue
        try:
            if crc:
                raw = _unwrap_crc32c(raw, key)
            if stop - start == rows:  # a whole chunk: decode in place
                _decode(codec, raw, flat[start:stop].reshape(-1))
            else:  # the edge chunk is stored whole (padded): decode, then keep its first rows
                buf = np.empty(rows * flat.shape[1], dtype=np.uint8)
                _decode(codec, raw, buf)
                flat[start:stop] = buf.reshape(rows, -1)[: stop - start]
        except DamagedChunk:
            raise
        except Exception as e:  # blosc/zstd/size errors on damaged bytes
            raise DamagedChunk(f"{key}: cannot decode ({type(e).__name__}: {' '.join(str(e).split())})") from e
    if swap:
        out.byteswap(inplace=True)
    return out
