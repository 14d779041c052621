"""The only module that knows the Zarr (v3) layout of tile and feature stores.

Tile store `tiles/<slide_id>.zarr`: one group per magnification ("20x", "10x", "5x") with
`coords` (N, 2) int64, `grid` (N, 2) int32, `tissue` (N,) float32, `region` (N,) int32,
`parent` (N,) int64; provenance in the root attributes.

Feature store `features/<encoder>/<slide_id>.zarr`: one group per magnification with
`features` (N, D) float16 chunked along N, `coords`, `region` (copied, so the store is
self-contained) and `failed` (N,) bool; provenance in the root attributes. Every chunk is
written (all-zero ones too) and ends in a crc32c (`chunk_integrity` attribute): reading one
that is missing, changed or undecodable raises a SlideError naming the store, as do
non-finite features.

Every store is built under a temporary name and renamed when complete, so a store at its final
path is always whole. A store whose root attribute `status` is "failed" records why its slide
could not be processed (the workflow goes on with the other slides).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import __version__, zarr_io
from pipeline.atomic import dead_writer_leftovers, local_pid, pid_alive, writer_tag
from pipeline.errors import SlideError, StoreError, one_line
from pipeline.tiling import TileSet

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
TILE_ARRAYS = {"coords": np.int64, "grid": np.int32, "tissue": np.float32, "region": np.int32, "parent": np.int64}
# Features: LZ4 on bit-shuffled float16 (Blosc). On the demo's ResNet-18 features: 0.63 of the raw
# bytes (zstd: 0.69) and decodes ~3x faster (2.3 vs 0.7 GB/s, one core): training reads every
# store once per fold while the model computes.
FEATURE_CODEC = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
# Every feature-store chunk ends in a crc32c of its compressed bytes (Zarr v3's `crc32c` codec) and
# every chunk is written, even all-zero ones: a changed byte or a lost chunk file is an error at
# load instead of silent zeros. Cost (bench/integrity.py): reads 0.94-1.13x, within noise.
CHECKSUM_CODEC = zarr.codecs.Crc32cCodec()
INDEX_CODEC = zarr.codecs.ZstdCodec(level=0)
CHUNK_INTEGRITY = "crc32c, all chunks written"  # root attribute of feature stores written so
_PROGRESS = "progress.json"  # inside a partial feature store: rows completed per magnification


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished store into place, replacing an older one.

    Between the two renames the final path is briefly absent (a reader sees "missing", never a
    mixed store). Afterwards, temporary directories left by killed writers of this store on this
    host are removed, so an interrupted run leaves no garbage once a rerun completes.
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{writer_tag()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _remove_dead_leftovers(final)


def _tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{writer_tag()}")


def store_state(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(status, root attributes): status "ok", "failed", "missing" or "broken" (unreadable root
    metadata; attributes {} then), read in one go for callers that need both."""
    p = Path(path)
    if not p.exists():
        return "missing", {}
    try:
        attrs = read_attrs(p)
    except (OSError, ValueError):
        return "broken", {}
    return str(attrs.get("status", "broken")), attrs


def store_status(path: str | Path) -> str:
    """"ok", "failed", "missing" or "broken" (unreadable root metadata)."""
    return store_state(path)[0]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes of a store (v3 keeps them in the root `zarr.json`)."""
    meta = zarr_io.read_node_meta(path)
    if meta.get("node_type") != "group":
        raise ValueError(f"{path}: root is not a Zarr group")
    return dict(meta.get("attributes", {}))


def tiles_digest(tiles: dict[str, TileSet]) -> str:
    """sha256 of the tile coordinates of every magnification: what feature stores are tied to."""
    h = hashlib.sha256()
    for name, ts in tiles.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(ts.coords, dtype=np.int64).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- tile stores


def write_tile_store(path: str | Path, tiles: dict[str, TileSet], attrs: dict[str, Any]) -> None:
    """Write a complete tile store atomically (temporary name, then rename)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name, ts in tiles.items():
        n = len(ts)
        for key, dtype in TILE_ARRAYS.items():
            data = np.asarray(getattr(ts, key), dtype=dtype)
            chunks = (max(n, 1),) + data.shape[1:]
            arr = root.create_array(f"{name}/{key}", shape=data.shape, dtype=dtype, chunks=chunks)
            if n:
                arr[...] = data
    meta = {
        "layout_version": LAYOUT_VERSION,
        "kind": "tiles",
        "status": "ok",
        "magnifications": list(tiles),
        "n_tiles": {name: len(ts) for name, ts in tiles.items()},
        "tiles_sha256": tiles_digest(tiles),
        "package_version": __version__,
        **attrs,
    }
    root.attrs.update(_json_safe(meta))
    _replace_dir(tmp, final)


def write_failed_store(path: str | Path, kind: str, slide_id: str, error: str, attrs: dict[str, Any] | None = None) -> None:
    """A store that records why `slide_id` failed, so the cohort goes on and the report lists it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    meta = {"layout_version": LAYOUT_VERSION, "kind": kind, "status": "failed", "slide_id": slide_id,
            "error": error, "package_version": __version__, **(attrs or {})}
    root.attrs.update(_json_safe(meta))
    _replace_dir(tmp, final)


@dataclass
class TileStore:
    attrs: dict[str, Any]
    tiles: dict[str, TileSet]


def _require_ok(path: Path, kind: str) -> dict[str, Any]:
    """Root attributes of a finished store of `kind`; anything else raises a SlideError."""
    status, attrs = store_state(path)
    if status == "missing":
        raise SlideError(path.stem, f"{kind} store not found: {path}")
    if status == "failed":
        raise SlideError(attrs.get("slide_id", path.stem), str(attrs.get("error", "failed earlier")))
    if status != "ok":
        raise SlideError(path.stem, f"{kind} store is unreadable: {path}")
    if attrs.get("kind") != kind:
        raise SlideError(path.stem, f"{path} is a {attrs.get('kind')} store, not a {kind} store")
    return attrs


def read_tile_store(path: str | Path) -> TileStore:
    """Read a finished tile store; a failed one raises its recorded SlideError."""
    path = Path(path)
    attrs = _require_ok(path, "tiles")
    tiles = {}
    for name in attrs["magnifications"]:
        tiles[name] = TileSet(**{k: np.asarray(zarr_io.read_array(path / name / k), dtype=dt)
                                 for k, dt in TILE_ARRAYS.items()})
    return TileStore(attrs=attrs, tiles=tiles)


# --------------------------------------------------------------------------- feature stores


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float16
    coords: np.ndarray  # (N, 2) int64
    region: np.ndarray  # (N,) int32
    failed: np.ndarray  # (N,) bool, tiles that could not be decoded


class StoreBusy(RuntimeError):
    """Another process is writing this store."""


_HELD_LOCKS: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the lock files this process holds


class WriterLock:
    """The lock file `.<store>.lock` beside a store being written, held with a POSIX write lock
    (fcntl F_SETLK); StoreBusy when another writer holds it.

    POSIX record locks belong to the process, not to the open file: forked children (DataLoader
    workers) do not inherit them, so a writer killed with -9 frees the store at once instead of
    when its orphaned workers notice and exit. They do not exclude the own process, hence the
    in-process registry; and closing any descriptor of the file drops them, hence the check
    before opening it a second time.
    """

    def __init__(self, store: str | Path):
        store = Path(store)
        self.path = store.with_name(f".{store.name}.lock")
        while True:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) in _HELD_LOCKS:
                    raise StoreBusy(f"another writer in this process is writing {store}")
            fh = open(self.path, "a")
            try:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                fh.close()
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise StoreBusy(f"another process is writing {store}") from None
                raise
            st = os.fstat(fh.fileno())
            try:  # the previous holder unlinks the file when done: make sure ours is still the one there
                if os.stat(self.path).st_ino == st.st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        self._fh, self._key = fh, (st.st_dev, st.st_ino)
        _HELD_LOCKS.add(self._key)

    @property
    def held(self) -> bool:
        return not self._fh.closed

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._fh.close()
            _HELD_LOCKS.discard(self._key)


class FeatureStoreWriter:
    """Resumable writer: chunks land in `<store>.partial` as they complete, then one rename.

    A restart with the same `attrs` continues after the last committed chunk; different attrs
    (another encoder, changed tiles) start over. A lock file keeps two writers apart.
    """

    def __init__(self, path: str | Path, tiles: dict[str, TileSet], dims: dict[str, int],
                 attrs: dict[str, Any], chunk_rows: int = 2048):
        self.final = Path(path)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.final.with_name(self.final.name + ".partial")
        self.chunk_rows = chunk_rows
        self._lock = WriterLock(self.final)
        meta = _json_safe({
            "layout_version": LAYOUT_VERSION, "kind": "features", "status": "ok",
            "magnifications": list(tiles), "n_tiles": {k: len(v) for k, v in tiles.items()},
            "dims": dims, "chunk_rows": chunk_rows, "chunk_integrity": CHUNK_INTEGRITY,
            "package_version": __version__, **attrs,
        })
        self.progress = self._resume(meta)
        if self.progress is None:
            self._create(tiles, dims, meta)
        self.root = zarr.open_group(str(self.partial), mode="r+")

    def _resume(self, meta: dict[str, Any]) -> dict[str, int] | None:
        """Rows already committed per magnification, or None to start over: no partial store,
        one of other parameters, or one that cannot be read (said in the log, never silently)."""
        prog = self.partial / _PROGRESS
        if not self.partial.exists():
            return None
        try:
            old = dict(zarr.open_group(str(self.partial), mode="r").attrs)
            done = json.loads(prog.read_text())
        except (OSError, ValueError) as e:  # zarr's "no group" errors are both; bad JSON is a ValueError
            log.warning("%s: cannot resume the partial store (%s: %s); starting over",
                        self.final.name, type(e).__name__, one_line(e))
            return None
        if old != meta:
            log.info("%s: the partial store was made with other parameters; starting over", self.final.name)
            return None
        # zarr writes each chunk to `<chunk>.<uuid>.partial` and renames it: a kill in between
        # leaves that file behind, and it would travel into the finished store
        for f in self.partial.rglob("*.partial"):
            if re.fullmatch(r".*\.[0-9a-f]{32}\.partial", f.name) and f.is_file():
                f.unlink()
        return {k: int(v) for k, v in done.items()}

    def _create(self, tiles, dims, meta) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        root = zarr.open_group(str(self.partial), mode="w", zarr_format=3)
        for name, ts in tiles.items():
            n, d = len(ts), dims[name]
            rows = max(1, min(self.chunk_rows, n))
            root.create_array(f"{name}/features", shape=(n, d), dtype=np.float16, chunks=(rows, d),
                              compressors=[FEATURE_CODEC, CHECKSUM_CODEC])
            root.create_array(f"{name}/failed", shape=(n,), dtype=bool, chunks=(rows,),
                              compressors=[INDEX_CODEC, CHECKSUM_CODEC])
            for key in ("coords", "region"):
                data = np.asarray(getattr(ts, key), dtype=TILE_ARRAYS[key])
                arr = root.create_array(f"{name}/{key}", shape=data.shape, dtype=data.dtype,
                                        chunks=(max(n, 1),) + data.shape[1:],
                                        compressors=[INDEX_CODEC, CHECKSUM_CODEC],
                                        config={"write_empty_chunks": True})
                if n:
                    arr[...] = data
        root.attrs.update(meta)
        self._write_progress({name: 0 for name in tiles})
        self.progress = {name: 0 for name in tiles}

    def _write_progress(self, progress: dict[str, int]) -> None:
        tmp = self.partial / (_PROGRESS + ".tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, self.partial / _PROGRESS)

    def rows_done(self, mag: str) -> int:
        return self.progress[mag]

    def write(self, mag: str, start: int, feats: np.ndarray, failed: np.ndarray) -> None:
        """Write rows [start, start + len) and commit them; `start` must be where the last write ended."""
        if start != self.progress[mag]:  # rows out of order would leave a gap no reader could see
            raise StoreError(f"{self.final.name} {mag}: rows must follow the last write (row {self.progress[mag]}), got {start}")
        end = start + len(feats)
        feats = np.asarray(feats, dtype=np.float16)
        if nonfinite_rows(feats).any():  # the extractor names the tile; this guards the layout
            raise StoreError(f"{self.final.name} {mag}: non-finite features in rows {start}-{end}")
        g = self.root[mag]
        with zarr.config.set({"array.write_empty_chunks": True}):  # a missing chunk = a lost chunk
            g["features"][start:end] = feats
            g["failed"][start:end] = np.asarray(failed, dtype=bool)
        self.progress[mag] = end
        self._write_progress(self.progress)

    def finalize(self) -> None:
        (self.partial / _PROGRESS).unlink(missing_ok=True)
        _replace_dir(self.partial, self.final)
        self.close()

    def close(self) -> None:
        self._lock.release()


def read_feature_store(path: str | Path, mags: list[str] | None = None) -> tuple[dict[str, Any], dict[str, FeatureSet]]:
    """Attributes and per-magnification features of a finished feature store.

    A store that cannot be trusted raises a SlideError naming it: a chunk whose checksum fails,
    that cannot be decoded or (stores written with every chunk) is missing, arrays of different
    lengths, or non-finite features on tiles not marked failed. Training never sees such a slide.
    """
    path = Path(path)
    attrs = _require_ok(path, "features")
    slide = attrs.get("slide_id", path.stem)
    strict = attrs.get("chunk_integrity") == CHUNK_INTEGRITY
    out = {}
    for name in mags or attrs["magnifications"]:
        try:
            arrays = {k: zarr_io.read_array(path / name / k, require_chunks=strict)
                      for k in ("features", "coords", "region", "failed")}
        except (OSError, ValueError) as e:
            raise SlideError(slide, f"feature store {path} is damaged ({one_line(e)}); "
                                    "delete it and rerun to extract again") from e
        fs = FeatureSet(**arrays)
        n = {len(fs.features), len(fs.coords), len(fs.region), len(fs.failed)}
        if len(n) != 1:
            raise SlideError(slide, f"feature store {path} is damaged: {name} arrays disagree on the tile count {sorted(n)}")
        bad = nonfinite_rows(fs.features) & ~fs.failed.astype(bool)
        if bad.any():
            i = int(np.argmax(bad))
            raise SlideError(slide, f"feature store {path}: {int(bad.sum())} {name} tile(s) with non-finite features "
                                    f"(NaN/inf), first #{i} at level-0 ({int(fs.coords[i, 0])}, {int(fs.coords[i, 1])}); "
                                    "delete it and extract again")
        out[name] = fs
    return attrs, out


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


def nonfinite_rows(features: np.ndarray) -> np.ndarray:
    """(N,) bool: rows holding a NaN or inf. float16 by its bits (exponent all ones = |bits| >=
    0x7C00): one masked max over the array (~6x faster than np.isfinite on float16, ~0.2 of the
    decode time), rows located only when there is one."""
    if features.dtype == np.float16 and features.ndim == 2:
        bits = features.view(np.uint16)
        if features.size == 0 or int((bits & 0x7FFF).max()) < 0x7C00:
            return np.zeros(len(features), bool)
        return ((bits & 0x7FFF) >= 0x7C00).any(axis=1)
    return ~np.isfinite(features).reshape(len(features), -1).all(axis=1)


def open_features_dask(path: str | Path, mags: list[str] | None = None) -> dict[str, tuple[Any, Any]]:
    """mag -> (features (N, D) float16, failed (N,) bool) of a finished feature store as lazy Dask
    arrays, chunked as stored (along N): nothing is read until computed. Default: every magnification."""
    import dask.array as da

    path = Path(path)
    attrs = _require_ok(path, "features")
    missing = [m for m in mags or [] if m not in attrs["magnifications"]]
    if missing:
        raise SlideError(attrs.get("slide_id", path.stem), f"{path} has no {', '.join(missing)} features")
    root = zarr.open_group(str(path), mode="r")
    tag = f"{path.resolve()}:{attrs.get('tiles_sha256', '')}"  # names the graph keys (no hashing of the arrays)
    return {m: (da.from_zarr(root[f"{m}/features"], name=f"features-{tag}-{m}"),
                da.from_zarr(root[f"{m}/failed"], name=f"failed-{tag}-{m}"))
            for m in mags or attrs["magnifications"]}


# --------------------------------------------------------------------------- read-only inspection (verify)


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


_LEFTOVER_MARKERS = (".tmp-", ".old-")


def _split_leftover(name: str) -> tuple[str, str] | None:
    """(store name, writer tag) of `.<name>.tmp-<tag>` / `.<name>.old-<tag>`, else None."""
    if name.startswith("."):
        for marker in _LEFTOVER_MARKERS:
            base, sep, tag = name[1:].rpartition(marker)
            if sep and base and tag:
                return base, tag
    return None


def leftover_target(path: str | Path) -> Path | None:
    """The store a leftover directory of an interrupted writer belongs to; None if `path` is not one.

    Leftovers: `<name>.partial` (resumable feature store), `.<name>.tmp-<host>-<pid>` (store being
    built) and `.<name>.old-<host>-<pid>` (the previous store, moved aside while being replaced).
    """
    p = Path(path)
    if p.name.endswith(".partial"):
        return p.with_name(p.name.removesuffix(".partial"))
    parts = _split_leftover(p.name)
    return p.with_name(parts[0]) if parts else None


def leftover_writer(path: str | Path) -> int | None:
    """pid of the live process on this host still writing a leftover directory, else None."""
    p = Path(path)
    final = leftover_target(p)
    if final is None:
        return None
    if p.name.endswith(".partial"):  # resumable feature store: its writer holds the lock file
        return _lock_holder(final.with_name(f".{final.name}.lock"))
    pid = local_pid(_split_leftover(p.name)[1])
    return pid if pid is not None and pid_alive(pid) else None


def _lock_holder(lock: Path) -> int | None:
    """pid holding a lock on `lock`, read from /proc/locks (never takes the lock itself)."""
    try:
        st = os.stat(lock)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] in ("POSIX", "FLOCK") and f[5] == want and f[4].isdigit():
            return int(f[4])
    return None


def _remove_dead_leftovers(final: Path) -> None:
    """Remove `.tmp-`/`.old-` directories of `final` whose writer process is gone."""
    for marker in _LEFTOVER_MARKERS:
        for p in dead_writer_leftovers(final.parent, f".{final.name}{marker}"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
