"""The only package that knows the Zarr (v3) layout of tile and feature stores.

Tile store `tiles/<slide_id>.zarr`: one group per magnification ("20x", "10x", "5x") with
`coords` (N, 2) int64, `grid` (N, 2) int32, `tissue` (N,) float32, `region` (N,) int32,
`parent` (N,) int64; metadata (:class:`TileStoreMeta`) in the root attributes.

Feature store `features/<encoder>/<slide_id>.zarr`: one group per magnification with
`features` (N, D) float16 chunked along N, `coords`, `region` (copied, so the store is
self-contained) and `failed` (N,) bool; metadata (:class:`FeatureStoreMeta`) in the root
attributes. Every chunk is written (all-zero ones too) and ends in a crc32c: reading one that is
missing, changed or undecodable raises a SlideError naming the store, as do non-finite features.

Every store is built under a temporary name and renamed when complete, so a store at its final
path is always whole. A store whose root attribute `status` is "failed" records why its slide
could not be processed (the workflow goes on with the other slides).

Modules: `contract` (array specs, tile/feature sets, typed metadata, status), `tiles`,
`features`, `lifecycle` (temporary names, the writer lock, leftovers), `inspect` (read-only,
for verify) and `zarr_io` (the lean v3 chunk reader).
"""

from pipeline.store.contract import (
                                     CHECKSUM_CODEC,
                                     CHUNK_INTEGRITY,
                                     COPIED_ARRAYS,
                                     FEATURE_ARRAYS,
                                     FEATURE_CODEC,
                                     LAYOUT_VERSION,
                                     TILE_ARRAYS,
                                     ArraySpec,
                                     FeatureSet,
                                     FeatureStoreMeta,
                                     TileSet,
                                     TileStoreMeta,
                                     read_attrs,
                                     read_feature_meta,
                                     read_tile_meta,
                                     store_state,
                                     store_status,
                                     tiles_digest,
)
from pipeline.store.features import (
                                     FeatureStoreWriter,
                                     nonfinite_rows,
                                     open_features_dask,
                                     read_feature_store,
)
from pipeline.store.inspect import (
                                     ArrayInfo,
                                     chunk_problems,
                                     iter_array_rows,
                                     list_arrays,
                                     read_array,
)
from pipeline.store.lifecycle import (
                                     StoreBusy,
                                     WriterLock,
                                     leftover_target,
                                     leftover_writer,
                                     replace_dir,
                                     write_failed_store,
)
from pipeline.store.tiles import TileStore, read_tile_store, write_tile_store

__all__ = [
    "CHECKSUM_CODEC", "CHUNK_INTEGRITY", "COPIED_ARRAYS", "FEATURE_ARRAYS", "FEATURE_CODEC", "LAYOUT_VERSION",
    "TILE_ARRAYS", "ArrayInfo", "ArraySpec", "FeatureSet", "FeatureStoreMeta", "FeatureStoreWriter", "StoreBusy",
    "TileSet", "TileStore", "TileStoreMeta", "WriterLock", "chunk_problems", "iter_array_rows", "leftover_target",
    "leftover_writer", "list_arrays", "nonfinite_rows", "open_features_dask", "read_array", "read_attrs",
    "read_feature_meta", "read_feature_store", "read_tile_meta", "read_tile_store", "replace_dir", "store_state",
    "store_status", "tiles_digest", "write_failed_store", "write_tile_store",
]
