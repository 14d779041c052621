"""A slide's bag as numpy arrays, read from its feature stores: per magnification the features,
tile coordinates, M2OTCA's E1 groups and tile centres.

numpy only, never torch: the bag reader process (:mod:`pipeline.mil.bag_reader`) builds whole
bags with it, and the trainer's prefetch thread does too, where each small torch op (sort,
bucketize) would start an OpenMP team of its own that spins for ~1 ms of CPU while the training
step needs those cores (~7 ms of CPU per slide on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import SlideError
from pipeline.store import read_feature_store

KINDS = ("feats", "coords", "group", "xy")  # the arrays of a bag, each magnification -> array


def mag_values(keys) -> dict[str, float]:
    """magnification -> its value, e.g. {"20x": 20.0}, read off the keys by the models' rule
    (imported only here: the reader process passes the values instead, never importing torch)."""
    from pipeline.mil.models.config import magnification_value

    return {t: magnification_value(t) for t in keys}


def read_slide(stores: dict[str, Path]) -> tuple[dict, dict, dict]:
    """(features, coords, region ids) per magnification of one slide from its feature stores;
    failed tiles dropped. Damaged stores raise SlideError naming them."""
    feats: dict[str, np.ndarray] = {}
    coords: dict[str, np.ndarray] = {}
    regions: dict[str, np.ndarray] = {}
    by_store: dict[Path, list[str]] = {}
    for mag, p in stores.items():
        by_store.setdefault(Path(p), []).append(mag)
    for p, mags in by_store.items():
        _, sets = read_feature_store(p, mags)
        for mag in mags:
            s = sets[mag]
            if s.failed.any():
                keep = ~s.failed
                s.features, s.coords, s.region = s.features[keep], s.coords[keep], s.region[keep]
            feats[mag], coords[mag], regions[mag] = s.features, s.coords, s.region
    return feats, coords, regions


def assign_groups(region_ref: np.ndarray, regions: dict[str, np.ndarray], m: int) -> dict[str, np.ndarray]:
    """M2OTCA's E1 groups: group index in [0, m) of every tile of every magnification.

    Args:
        region_ref: (N_ref,) region id of each tile of the finest magnification (the reference).
        regions: magnification -> (N_t,) region id of each tile (a region is the tissue patch the
            magnifications share, e.g. one coarse tile; tiles are stored sorted by region id).
        m: number of groups.

    Returns:
        magnification -> (N_t,) int64 group index.

    The boundaries are the region ids of the reference tiles at the cumulative-count quantiles
    ``k * N_ref // m`` (k = 1..m-1); the group of a region id r at ANY magnification is the
    number of boundaries <= r. Hence groups are runs of consecutive regions (a region is never
    split), group k covers the same tissue at every magnification, each holds about N_ref / m
    reference tiles (up to one region's size), a region with no reference tile joins the group
    of the nearest preceding boundary, and with fewer regions than m some groups are empty (the
    model masks them, nothing is faked).
    """
    if m < 1:
        raise ValueError(f"number of groups must be >= 1, got {m}")
    ref = np.sort(np.asarray(region_ref, dtype=np.int64).reshape(-1))  # (N_ref,)
    bounds = ref[np.arange(1, m) * len(ref) // m] if len(ref) else ref[:0]  # (m - 1,)
    return {t: np.searchsorted(bounds, np.asarray(r, dtype=np.int64).reshape(-1), side="right").astype(np.int64)
            for t, r in regions.items()}


def tile_sides(coords: dict[str, np.ndarray], values: dict[str, float] | None = None) -> dict[str, float]:
    """Level-0 side of each magnification's tiles, read off the grid the coordinates lie on.

    Tiles of one magnification sit on a grid of pitch = their side, so the smallest positive
    step between distinct x (or y) values is the side (exact up to the 1 px rounding of the
    grid); it is measured on the finest magnification with such a step and scaled to the
    others by the magnification ratio (the grid is nested). 0.0 when no magnification has two
    tiles in adjacent columns or rows (a one-tile bag: centres need no offset then).
    `values`: :func:`mag_values` of the keys, computed when not given.
    """
    values = values or mag_values(coords)
    for mag in sorted(coords, key=values.__getitem__, reverse=True):  # finest first
        steps = [np.diff(np.unique(np.asarray(coords[mag])[:, k])) for k in (0, 1) if len(coords[mag])]
        steps = [d[d > 0].min() for d in steps if (d > 0).any()]
        if steps:
            side = float(min(steps))
            return {t: side * values[mag] / values[t] for t in coords}
    return {t: 0.0 for t in coords}


def bag_arrays(slide_id: str, feats: dict[str, np.ndarray], coords: dict[str, np.ndarray],
               regions: dict[str, np.ndarray], n_groups: int,
               values: dict[str, float] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """kind (:data:`KINDS`) -> magnification -> array of one slide's bag: features (N_t, D_t) as
    stored, coords (N_t, 2) level-0 top-left, group (N_t,) int64 (E1's sequential batches, defined
    by the finest magnification) and xy (N_t, 2) float32 tile centres. `values` as in
    :func:`tile_sides`. A slide with no tile at any magnification raises SlideError."""
    if sum(len(f) for f in feats.values()) == 0:
        raise SlideError(slide_id, "no tiles with tissue at any magnification")
    values = values or mag_values(feats)
    ref = max(feats, key=values.__getitem__)  # the finest magnification defines the groups
    side = tile_sides(coords, values)
    xy = {m: (np.asarray(c, np.float64) + side[m] / 2).astype(np.float32).reshape(-1, 2) for m, c in coords.items()}
    return {"feats": {m: np.ascontiguousarray(f) for m, f in feats.items()}, "coords": coords,
            "group": assign_groups(regions[ref], regions, n_groups), "xy": xy}
