"""Region annotations of a slide as shapely geometry in level-0 pixels, per class.

Reads QuPath's GeoJSON export (a FeatureCollection, or QuPath's older bare list of Features:
`properties.classification.name` is the class, `objectType` the kind of object) and ASAP XML
as CAMELYON16 ships its lesion annotations (`Annotation` elements with `Coordinate` X/Y in
level-0 px; the class is `PartOfGroup`: `_0` and `_1` tumour, `_2` non-tumour inside a tumour).
Invalid polygons are repaired (shapely `make_valid`), parts outside the slide clipped, parts
entirely outside dropped, each with one logged line naming the file; a file that is neither
format raises :class:`AnnotationError` naming it.

The tiling stage uses classes to restrict the tissue mask (`include`: only there; `exclude`:
never there, e.g. pen marks the mask kept), and lesion classes label tiles for the lesion
localisation figures (:func:`lesion_geometry`).
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from pipeline.errors import AnnotationError

log = logging.getLogger(__name__)

UNCLASSIFIED = "Unclassified"  # class of a QuPath object without a classification
# QuPath object types read as annotations by default: `tile` objects are the pipeline's own grid
# (see pipeline.report.geojson), not something a person drew.
ANNOTATION_TYPES = ("annotation", "detection", "cell", "unknown")


def _polygonal(g: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry (lines and points of a GeometryCollection dropped)."""
    if isinstance(g, (Polygon, MultiPolygon)):
        return g
    parts = [p for p in getattr(g, "geoms", []) if isinstance(p, (Polygon, MultiPolygon))]
    return shapely.unary_union(parts) if parts else Polygon()


def _read_geojson(data, path: Path, object_types: Iterable[str]) -> list[tuple[str, BaseGeometry]]:
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    elif isinstance(data, list):  # QuPath before 0.4 exported a bare array of Features
        features = data
    else:
        raise AnnotationError(f"{path}: JSON but not GeoJSON (no FeatureCollection, Feature or Polygon at the top)")
    if not isinstance(features, list):
        raise AnnotationError(f"{path}: GeoJSON `features` is not a list")
    wanted = set(object_types)
    out, skipped = [], 0
    for i, f in enumerate(features):
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise AnnotationError(f"{path}: feature {i} has no geometry object")
        props = f.get("properties") or {}
        kind = props.get("objectType") or props.get("object_type") or "unknown"
        if kind not in wanted:
            continue
        cls = props.get("classification")
        name = (cls.get("name") if isinstance(cls, dict) else cls) or UNCLASSIFIED
        try:
            g = shape(f["geometry"])
        except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException) as e:
            raise AnnotationError(f"{path}: feature {i} ({name}): unreadable geometry: {e}") from e
        poly = _polygonal(g)
        if poly.is_empty:
            skipped += 1
            continue
        out.append((str(name), poly))
    if skipped:
        log.warning("%s: %d feature(s) without area (points, lines) ignored", path, skipped)
    return out


def _coord(v: str | None) -> float:
    return float((v or "nan").replace(",", "."))  # some ASAP files write decimal commas


def _read_asap(root: ET.Element, path: Path) -> list[tuple[str, BaseGeometry]]:
    out, skipped = [], 0
    for i, ann in enumerate(root.iter("Annotation")):
        name = ann.get("PartOfGroup") or ann.get("Name") or UNCLASSIFIED
        kind = (ann.get("Type") or "Polygon").lower()
        pts = sorted(((int(c.get("Order") or k), _coord(c.get("X")), _coord(c.get("Y")))
                      for k, c in enumerate(ann.iter("Coordinate"))), key=lambda t: t[0])
        if kind in ("dot", "pointset") or len(pts) < 3:
            skipped += 1
            continue
        xy = [(x, y) for _, x, y in pts]
        if not all(math.isfinite(v) for p in xy for v in p):
            raise AnnotationError(f"{path}: annotation {i} ({name}): a coordinate is not a number")
        out.append((name, Polygon(xy)))
    if skipped:
        log.warning("%s: %d annotation(s) without area (dots, point sets) ignored", path, skipped)
    return out


def parse_annotation_file(path: str | Path, object_types: Iterable[str] = ANNOTATION_TYPES) -> list[tuple[str, BaseGeometry]]:
    """(class, polygonal geometry) of every annotation in the file, as written (not yet repaired)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AnnotationError(f"{path}: {e.strerror or e}") from e
    text = raw.lstrip(b"\xef\xbb\xbf").lstrip()
    if text[:1] in (b"{", b"["):
        try:
            return _read_geojson(json.loads(text), path, object_types)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}: broken JSON ({e.msg} at line {e.lineno})") from e
    if text[:1] == b"<":
        try:
            root = ET.fromstring(text)
        except ET.ParseError as e:
            raise AnnotationError(f"{path}: broken XML ({e})") from e
        if root.tag != "ASAP_Annotations":
            raise AnnotationError(f"{path}: XML with root <{root.tag}>, not ASAP (<ASAP_Annotations>)")
        return _read_asap(root, path)
    raise AnnotationError(f"{path}: neither GeoJSON nor ASAP XML")


def clean(items: list[tuple[str, BaseGeometry]], path: str | Path,
          slide_size: tuple[int, int] | None = None) -> dict[str, BaseGeometry]:
    """Repair invalid polygons, clip to the slide (width, height), union per class; one line per problem kind."""
    repaired, refused, clipped, outside = [], [], [], []
    per_class: dict[str, list[BaseGeometry]] = {}
    frame = box(0, 0, *slide_size) if slide_size else None
    for name, g in items:
        if not g.is_valid:
            why = shapely.is_valid_reason(g)
            g = _polygonal(shapely.make_valid(g))
            (repaired if not g.is_empty else refused).append(f"{name} ({why})")
            if g.is_empty:
                continue
        if frame is not None and not frame.contains(g):
            if not frame.intersects(g) or frame.intersection(g).area == 0:
                minx, miny, maxx, maxy = g.bounds
                outside.append(f"{name} at x {minx:.0f}..{maxx:.0f}, y {miny:.0f}..{maxy:.0f}")
                continue
            clipped.append(name)
            g = _polygonal(frame.intersection(g))
        per_class.setdefault(name, []).append(g)
    if repaired:
        log.warning("%s: %d invalid polygon(s) repaired (make_valid), first: %s", path, len(repaired), repaired[0])
    if refused:
        log.warning("%s: %d invalid polygon(s) refused (no area left after repair), first: %s", path, len(refused), refused[0])
    if clipped:
        log.warning("%s: %d polygon(s) reach beyond the slide (%d x %d px) and were clipped to it, first: %s",
                    path, len(clipped), *slide_size, clipped[0])
    if outside:
        log.warning("%s: %d polygon(s) lie outside the slide (%d x %d px) and were refused, first: %s",
                    path, len(outside), *slide_size, outside[0])
    return {name: _polygonal(shapely.make_valid(shapely.unary_union(gs))) for name, gs in per_class.items()}


def read_annotations(path: str | Path, slide_size: tuple[int, int] | None = None,
                     object_types: Iterable[str] = ANNOTATION_TYPES) -> dict[str, BaseGeometry]:
    """Class name -> (Multi)Polygon in level-0 px of a QuPath GeoJSON or ASAP XML file.

    `slide_size` (level-0 width, height), when given, clips polygons to the slide and refuses those
    entirely outside it. Raises AnnotationError (one line naming the file) for other formats.
    """
    return clean(parse_annotation_file(path, object_types), path, slide_size)


def union_of(annotations: dict[str, BaseGeometry], classes: Iterable[str]) -> BaseGeometry:
    """Union of the named classes present (an empty Polygon when none is)."""
    parts = [annotations[c] for c in classes if c in annotations]
    return shapely.unary_union(parts) if parts else Polygon()


def lesion_geometry(annotations: dict[str, BaseGeometry], lesion_classes: Iterable[str],
                    non_lesion_classes: Iterable[str] = ()) -> BaseGeometry:
    """Lesion area: the lesion classes minus the non-lesion ones (CAMELYON16: `_0`, `_1` minus `_2`)."""
    return _polygonal(union_of(annotations, lesion_classes).difference(union_of(annotations, non_lesion_classes)))


def lesion_geometries(slides: dict[str, Path | None], lesion_classes: Iterable[str],
                      non_lesion_classes: Iterable[str] = ()) -> dict[str, BaseGeometry]:
    """slide_id -> lesion geometry for every slide with an annotation file (e.g. the sheet's
    `annotations` column); a file that cannot be read is one logged line, the others go on."""
    lesion_classes, non_lesion_classes = list(lesion_classes), list(non_lesion_classes)
    out = {}
    for sid, path in slides.items():
        if path is None:
            continue
        try:
            out[sid] = lesion_geometry(read_annotations(path), lesion_classes, non_lesion_classes)
        except AnnotationError as e:
            log.error("%s: lesion annotations left out: %s", sid, e)
    return out


# --------------------------------------------------------------------------- rasterising


def rasterize(geom: BaseGeometry, shape_hw: tuple[int, int], scale: float) -> np.ndarray:
    """(H, W) uint8 {0, 1}: mask pixels whose centre lies in `geom` (level-0 px; `scale` = level-0 px
    per mask px). Holes stay holes, islands in holes are filled."""
    import cv2

    out = np.zeros(shape_hw, np.uint8)
    polys = [geom] if isinstance(geom, Polygon) else list(getattr(geom, "geoms", []))
    shift = 4  # sub-pixel vertices (1/16 px)

    def ring(r) -> np.ndarray:  # level-0 -> mask px, pixel centres at integers
        xy = np.asarray(r.coords)[:, :2] / scale - 0.5
        return np.rint(xy * (1 << shift)).astype(np.int32)

    for p in polys:
        if not isinstance(p, Polygon) or p.is_empty:
            continue
        minx, miny, maxx, maxy = (np.array(p.bounds) / scale).tolist()
        x0, y0 = max(0, int(minx) - 1), max(0, int(miny) - 1)
        x1, y1 = min(shape_hw[1], int(math.ceil(maxx)) + 1), min(shape_hw[0], int(math.ceil(maxy)) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        buf = np.zeros((y1 - y0, x1 - x0), np.uint8)  # this polygon alone, in its bounding box
        off = np.array([x0, y0]) << shift
        cv2.fillPoly(buf, [ring(p.exterior) - off], 1, lineType=cv2.LINE_8, shift=shift)
        if p.interiors:
            cv2.fillPoly(buf, [ring(r) - off for r in p.interiors], 0, lineType=cv2.LINE_8, shift=shift)
        out[y0:y1, x0:x1] |= buf
    return out


def mask_restriction(annotations: dict[str, BaseGeometry], include: Iterable[str] = (),
                     exclude: Iterable[str] = (), where: str = "") -> Callable[[np.ndarray, float], np.ndarray] | None:
    """A function (tissue mask, level-0 px per mask px) -> mask kept only inside the `include`
    classes (when any are named) and never inside the `exclude` ones; None when neither is named."""
    include, exclude = list(include), list(exclude)
    if not include and not exclude:
        return None
    if include and not any(c in annotations for c in include):
        log.warning("%s: none of the include classes %s is annotated (found %s): no tissue is kept",
                    where, include, sorted(annotations))
    inc = union_of(annotations, include) if include else None
    exc = union_of(annotations, exclude)

    def restrict(mask: np.ndarray, scale: float) -> np.ndarray:
        out = mask.copy()
        if inc is not None:
            out &= rasterize(inc, mask.shape, scale)
        if not exc.is_empty:
            out &= 1 - rasterize(exc, mask.shape, scale)
        return out

    return restrict
