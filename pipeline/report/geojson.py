"""QuPath export: a slide's tissue, kept tiles and models' attention as one GeoJSON FeatureCollection.

Coordinates are level-0 pixels with the origin at the top left of the full-resolution image,
as QuPath reads them (File > Import objects). Objects:

- the tissue (the tiling stage's mask, outlines with holes): `annotation` objects of class
  "Tissue", one per piece, editable;
- the kept tiles of every magnification: `tile` objects of class "Tile <mag>" with the
  measurement "Tissue fraction" and, per model with attention for the slide, "Attention <model>"
  (the model's tile attention; fold mean for a prediction ensemble) and "Attention rank <model>"
  (0 lowest .. 1 highest within the slide and magnification); a tile's own colour is the
  colour model's attention rank on the inferno scale (QuPath draws it over the class colour).

`properties` follow QuPath's GeoJSON (0.4+): `objectType`, `classification` {`name`, `color`
[r, g, b]}, `name`, `color`, `measurements` {name: number}. Feature ids are UUIDs derived from
the slide and object, so a rerun writes the same bytes. Read back with
:func:`pipeline.slides.annotations.read_annotations` (tiles: `object_types=("tile",)`).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry.base import BaseGeometry

from pipeline.atomic import write_text
from pipeline.errors import ConfigError
from pipeline.store import read_tile_store

TISSUE = ("Tissue", [0, 200, 0])
MAG_COLOURS = ([30, 110, 255], [160, 60, 220], [255, 140, 0])  # finest .. coarsest (as the QC picture)
_NS = uuid.UUID("5d0f8f2e-3c1a-4f55-9a43-6a7c0b0e1d12")  # namespace of the deterministic feature ids
DECIMALS = 2  # level-0 px


def mask_polygons(mask: np.ndarray, scale: float) -> list[Polygon]:
    """Tissue pieces of a 0/1 mask as polygons with holes in level-0 px (`scale` = level-0 px per
    mask px); vertices at the centres of the outline's mask pixels."""
    import cv2

    contours, hierarchy = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    hier = hierarchy[0]  # (K, 4): next, previous, first child, parent

    def ring(c: np.ndarray) -> np.ndarray:
        return (c.reshape(-1, 2).astype(np.float64) + 0.5) * scale

    out = []
    for i, c in enumerate(contours):
        if hier[i][3] >= 0 or len(c) < 3:
            continue
        holes, child = [], hier[i][2]
        while child >= 0:
            if len(contours[child]) >= 3:
                holes.append(ring(contours[child]))
            child = hier[child][0]
        p = shapely.make_valid(Polygon(ring(c), holes))
        out += [g for g in getattr(p, "geoms", [p]) if isinstance(g, Polygon) and g.area > 0]
    return out


def _rounded(g: BaseGeometry) -> dict[str, Any]:
    geo = mapping(shapely.set_precision(g, 10.0**-DECIMALS))
    return json.loads(json.dumps(geo, default=float), parse_float=lambda v: round(float(v), DECIMALS))


def feature(geom: BaseGeometry, object_type: str, key: str, cls: tuple[str, list[int]] | None = None,
            name: str | None = None, color: list[int] | None = None,
            measurements: dict[str, float] | None = None) -> dict[str, Any]:
    """One QuPath object as a GeoJSON Feature; `key` makes its id (unique within the file)."""
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = name
    if color is not None:
        props["color"] = [int(v) for v in color]
    if cls is not None:
        props["classification"] = {"name": cls[0], "color": [int(v) for v in cls[1]]}
    if measurements:
        props["measurements"] = {k: float(v) for k, v in measurements.items()}
    return {"type": "Feature", "id": str(uuid.uuid5(_NS, key)), "geometry": _rounded(geom), "properties": props}


def _inferno(v: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return np.rint(colormaps["inferno"](np.clip(v, 0, 1))[:, :3] * 255).astype(int)  # (N, 3)


def slide_attention(npz_files: list[str | Path], slide_id: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """mag -> (attention (N,), coords (N, 2)) of one slide from the evaluation (or prediction)
    attention.npz files that hold it (a slide is a test slide in one fold); {} when none does."""
    for f in npz_files:
        with np.load(f) as z:
            keys = [k for k in z.files if k.startswith(f"{slide_id}|") and k.endswith("|attention")]
            if keys:
                return {k.split("|")[1]: (z[k], z[k.removesuffix("attention") + "coords"]) for k in keys}
    return {}


def slide_features(tile_store: str | Path, mask_png: str | Path | None = None,
                   attention: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
                   colour_model: str | None = None) -> list[dict[str, Any]]:
    """Tissue (from the mask PNG), tiles and attention of one slide as QuPath GeoJSON Features."""
    import cv2

    ts = read_tile_store(tile_store)
    a = ts.meta
    sid = a.slide_id
    out = []
    if mask_png is not None:
        mask = cv2.imread(str(mask_png), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ConfigError(f"mask {mask_png}: not a readable PNG")
        for i, p in enumerate(mask_polygons(mask > 127, a.mask_mpp / a.base_mpp)):
            out.append(feature(p, "annotation", f"{sid}/tissue/{i}", TISSUE, name=f"Tissue {i + 1}",
                               measurements={"Area µm^2": p.area * a.base_mpp ** 2}))
    attention = attention or {}
    colour_model = colour_model if colour_model in attention else next(iter(attention), None)
    for k, (mag, tiles) in enumerate(ts.tiles.items()):
        side = float(a.tile_px_level0[mag])
        cls = (f"Tile {mag}", MAG_COLOURS[min(k, len(MAG_COLOURS) - 1)])
        meas: dict[str, np.ndarray] = {"Tissue fraction": tiles.tissue.astype(float)}
        for model, per_mag in attention.items():
            if mag not in per_mag:
                continue
            att, xy = per_mag[mag]
            where = {(int(x), int(y)): i for i, (x, y) in enumerate(xy)}
            idx = np.array([where.get((int(x), int(y)), -1) for x, y in tiles.coords])
            value = np.where(idx >= 0, att[idx].astype(float), np.nan)  # NaN: tile failed to decode
            ranks = np.argsort(np.argsort(att)) / max(1, len(att) - 1)
            meas[f"Attention {model}"] = value
            meas[f"Attention rank {model}"] = np.where(idx >= 0, ranks[idx], np.nan)
        rank = meas.get(f"Attention rank {colour_model}")
        colours = _inferno(np.nan_to_num(rank)) if rank is not None else None
        for i, (x, y) in enumerate(tiles.coords.tolist()):
            m = {n: v[i] for n, v in meas.items() if np.isfinite(v[i])}
            c = colours[i].tolist() if colours is not None and np.isfinite(rank[i]) else None
            out.append(feature(Polygon([(x, y), (x + side, y), (x + side, y + side), (x, y + side)]), "tile",
                               f"{sid}/{mag}/{i}", cls, name=f"{mag} #{i}", color=c, measurements=m))
    return out


def export_slide(tile_store: str | Path, out: str | Path, mask_png: str | Path | None = None,
                 attention: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
                 colour_model: str | None = None) -> int:
    """Write the slide's FeatureCollection to `out` (atomically); returns the number of objects."""
    feats = slide_features(tile_store, mask_png, attention, colour_model)
    write_text(out, json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":")))
    return len(feats)


def tissue_geometry(features: list[dict[str, Any]]) -> BaseGeometry:
    """Union of the Tissue annotations of an exported FeatureCollection's features (for checks)."""
    from shapely.geometry import shape

    parts = [shape(f["geometry"]) for f in features
             if (f["properties"].get("classification") or {}).get("name") == TISSUE[0]]
    return shapely.unary_union(parts) if parts else MultiPolygon()
