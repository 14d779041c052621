"""The store contract: array specs, the in-memory tile/feature sets and typed store metadata.

Readers and writers (`store.tiles`, `store.features`, `verify`) take the arrays' names, dtypes
and shapes from here, and every stage reads a store's root attributes through
:class:`TileStoreMeta` / :class:`FeatureStoreMeta`, never as a loose dict. On disk the
attributes stay one flat JSON object (the layout of stores written before these classes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import zarr

from pipeline import __version__
from pipeline.errors import SlideError
from pipeline.store import zarr_io

LAYOUT_VERSION = 1
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


@dataclass(frozen=True)
class ArraySpec:
    """One array of a magnification group: dtype and the shape after the tile axis N."""

    dtype: type
    tail: tuple[int | str, ...] = ()  # () -> (N,), (2,) -> (N, 2), ("D",) -> (N, D) with D free

    def shape_text(self) -> str:
        return "(" + ", ".join(["N", *map(str, self.tail)]) + ")" if self.tail else "(N,)"

    def fits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 1 + len(self.tail) and all(isinstance(t, str) or s == t for s, t in zip(shape[1:], self.tail))


TILE_ARRAYS = {
    "coords": ArraySpec(np.int64, (2,)),  # level-0 top-left x, y
    "grid": ArraySpec(np.int32, (2,)),  # row, col on this magnification's grid
    "tissue": ArraySpec(np.float32),  # tissue area fraction in [0, 1]
    "region": ArraySpec(np.int32),  # raster index of the coarsest cell holding the tile
    "parent": ArraySpec(np.int64),  # index of the parent tile one magnification coarser, -1 if none
}
FEATURE_ARRAYS = {
    "features": ArraySpec(np.float16, ("D",)),
    "failed": ArraySpec(np.bool_),  # tiles that could not be decoded (features all zero)
    "coords": TILE_ARRAYS["coords"],  # copied from the tile store: a feature store is self-contained
    "region": TILE_ARRAYS["region"],
}
COPIED_ARRAYS = ("coords", "region")  # feature-store arrays that must equal the tile store's


@dataclass
class TileSet:
    """The kept tiles of one magnification, in spatial order (arrays as in TILE_ARRAYS)."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left x, y
    grid: np.ndarray  # (N, 2) int32 row, col on this magnification's grid
    tissue: np.ndarray  # (N,) float32 tissue area fraction in [0, 1]
    region: np.ndarray  # (N,) int32 raster index of the coarsest cell holding the tile
    parent: np.ndarray  # (N,) int64 index of the parent tile one magnification coarser, -1 if none kept

    def __len__(self) -> int:
        return len(self.coords)


@dataclass
class FeatureSet:
    features: np.ndarray  # (N, D) float16
    coords: np.ndarray  # (N, 2) int64
    region: np.ndarray  # (N,) int32
    failed: np.ndarray  # (N,) bool, tiles that could not be decoded


def tiles_digest(tiles: dict[str, Any]) -> str:
    """sha256 of the tile coordinates of every magnification: what feature stores are tied to."""
    h = hashlib.sha256()
    for name, ts in tiles.items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(ts.coords, dtype=np.int64).tobytes())
    return h.hexdigest()


def json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


class _Meta:
    """Root attributes <-> dataclass; `kind` and `status` are the writer's, not fields."""

    KIND: ClassVar[str]
    _REQUIRED: ClassVar[tuple[str, ...]] = ("slide_id",)

    def to_attrs(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        extra = out.pop("extra", {}) or {}
        return json_safe({**extra, **out, "kind": self.KIND, "status": "ok"})

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path = "store"):
        """Typed metadata from root attributes; a missing required key is a SlideError naming the store."""
        missing = [k for k in cls._REQUIRED if k not in attrs]
        if missing:
            raise SlideError(attrs.get("slide_id", Path(where).stem),
                             f"{cls.KIND} store {where} lacks {', '.join(missing)} in its attributes; rebuild it")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        known = {k: v for k, v in attrs.items() if k in names and k != "extra"}
        for k in ("level0_size", "region_grid", "magnifications"):
            if k in known and known[k] is not None:
                known[k] = tuple(known[k])
        if "extra" in names:  # everything else but the writer's kind and status
            known["extra"] = {k: v for k, v in attrs.items() if k not in names and k not in ("kind", "status")}
        return cls(**known)


@dataclass(frozen=True)
class TileStoreMeta(_Meta):
    """Root attributes of a tile store: the slide, how it was tiled, and the tiles' digest."""

    KIND: ClassVar[str] = "tiles"
    slide_id: str
    slide_path: str = ""
    slide_fingerprint: str = ""
    slide_size_bytes: int = 0
    slide_mtime: float = 0.0
    vendor: str | None = None
    backend: str = ""
    level0_size: tuple[int, int] = (0, 0)  # width, height
    base_mpp: float = 0.0  # µm/px of level 0, as resolved (metadata or override)
    mpp_source: str = ""
    tiling: dict[str, Any] = field(default_factory=dict)  # TilingConfig.to_dict()
    mask_mpp: float = 0.0
    tile_px_level0: dict[str, float] = field(default_factory=dict)  # magnification -> level-0 px per tile side
    region_grid: tuple[int, int] = (0, 0)  # rows, cols of coarsest cells
    annotations: dict[str, Any] | None = None  # the include / exclude regions that restricted the mask
    magnifications: tuple[str, ...] = ()  # finest first; set by the writer from the tiles
    n_tiles: dict[str, int] = field(default_factory=dict)  # set by the writer
    tiles_sha256: str = ""  # set by the writer (tiles_digest)
    layout_version: int = LAYOUT_VERSION
    package_version: str = __version__

    def with_tiles(self, tiles: dict[str, TileSet]) -> TileStoreMeta:
        return dataclasses.replace(self, magnifications=tuple(tiles), n_tiles={k: len(v) for k, v in tiles.items()},
                                   tiles_sha256=tiles_digest(tiles))


@dataclass(frozen=True)
class FeatureStoreMeta(_Meta):
    """Root attributes of a feature store: its tiles, the encoder and how the chunks were written.

    `extra` holds the encoder's own provenance (EncoderSpec.attrs(): weights hash, transform,
    precision, ...), stored flat beside the other keys.
    """

    KIND: ClassVar[str] = "features"
    _REQUIRED: ClassVar[tuple[str, ...]] = ()
    slide_id: str = ""
    encoder: str = ""
    tiles_sha256: str = ""  # of the tile store the features were extracted from
    slide_fingerprint: str = ""
    tile_size: int | None = None
    target_mpp: dict[str, float] = field(default_factory=dict)  # magnification -> µm/px of its tiles
    on_tile_error: str = "fail"
    extra: dict[str, Any] = field(default_factory=dict)
    magnifications: tuple[str, ...] = ()  # set by the writer
    n_tiles: dict[str, int] = field(default_factory=dict)  # set by the writer
    dims: dict[str, int] = field(default_factory=dict)  # set by the writer
    chunk_rows: int = 0  # set by the writer
    chunk_integrity: str = CHUNK_INTEGRITY
    layout_version: int = LAYOUT_VERSION
    package_version: str = __version__

    def get(self, key: str, default: Any = None) -> Any:
        """A field or an encoder provenance key by its on-disk name."""
        return getattr(self, key) if key in {f.name for f in dataclasses.fields(self)} else self.extra.get(key, default)


# --------------------------------------------------------------------------- status


def read_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes of a store (v3 keeps them in the root `zarr.json`)."""
    meta = zarr_io.read_node_meta(path)
    if meta.get("node_type") != "group":
        raise ValueError(f"{path}: root is not a Zarr group")
    return dict(meta.get("attributes", {}))


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


def require_ok(path: Path, kind: str) -> dict[str, Any]:
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


def read_tile_meta(path: str | Path) -> TileStoreMeta:
    """Typed attributes of a finished tile store (SlideError when it is not one)."""
    return TileStoreMeta.from_attrs(require_ok(Path(path), "tiles"), path)


def read_feature_meta(path: str | Path) -> FeatureStoreMeta:
    """Typed attributes of a finished feature store (SlideError when it is not one)."""
    return FeatureStoreMeta.from_attrs(require_ok(Path(path), "features"), path)
