"""`python -m pipeline verify`: check finished stores against their layout and their inputs.

Every tile store and feature store found under the given folders (or given directly) is checked:
status and layout version; the required arrays with their dtypes and shapes; finite features;
coordinates inside the slide and on the grid; parent links; spatial order; tissue fractions; and
the fingerprints tying a tile store to its slide file and a feature store to its tile store.
Directories left by interrupted writers are reported too. Store internals are read through
`pipeline.store` only.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from pipeline import store as st
from pipeline.slides.files import fingerprint, fingerprint_matches
from pipeline.tiling.grid import Grid

# severity -> does it make `verify` fail?
SEVERITIES = {"broken": True, "stale": True, "incomplete": True, "missing": True, "failed": False}
INCOMPLETE = "incomplete (interrupted run; rerun to resume)"
_MAX_LISTED = 3  # tile indices quoted per problem


@dataclass(frozen=True)
class Problem:
    store: str  # the store (or folder) concerned
    problem: str  # one line
    severity: str  # a key of SEVERITIES

    @property
    def fails(self) -> bool:
        return SEVERITIES[self.severity]

    def __str__(self) -> str:
        return f"{self.store}: {self.problem}"


@dataclass
class Report:
    problems: list[Problem]
    stores: Counter  # kind -> number of stores checked ("tiles", "features", "failed", ...)

    @property
    def ok(self) -> bool:
        return not any(p.fails for p in self.problems)

    def summary(self) -> str:
        n = sum(self.stores.values())
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(self.stores.items()))
        counts = Counter(p.severity for p in self.problems)
        if self.ok:
            extra = f"; {counts['failed']} failed slide(s) recorded" if counts["failed"] else ""
            return f"verify: OK, {n} store(s) checked ({kinds or 'none'}){extra}"
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        where = len({p.store for p in self.problems if p.fails})
        return (f"verify: FAILED, {len(self.problems)} problem(s) ({parts}) in {where} store(s); "
                f"{n} store(s) checked ({kinds or 'none'})")


def verify_results(paths: list[str | Path]) -> list[Problem]:
    """Every problem found in the stores under `paths` (results folders or store paths)."""
    return verify(paths).problems


def verify(paths: list[str | Path]) -> Report:
    problems: list[Problem] = []
    stores: Counter = Counter()
    fp_cache: dict[str, str | None] = {}
    for root in map(Path, paths):
        if not root.exists():
            problems.append(Problem(str(root), "not found", "missing"))
            continue
        found, leftovers = _discover(root)
        if not found and not leftovers:
            problems.append(Problem(str(root), "no tile or feature stores found", "missing"))
        for lo in leftovers:
            pid = st.leftover_writer(lo)
            msg = (f"being written now by process {pid} ({lo.name}); verify again when it has finished"
                   if pid else f"{INCOMPLETE}: {lo.name} left behind")
            problems.append(Problem(str(st.leftover_target(lo)), msg, "incomplete"))
        for p in found:
            kind, probs = _check_store(p, fp_cache)
            stores[kind] += 1
            problems.extend(probs)
    return Report(problems, stores)


# --------------------------------------------------------------------------- discovery


def _discover(root: Path) -> tuple[list[Path], list[Path]]:
    """Stores (`*.zarr` directories, not descended into) and leftovers of interrupted writers."""
    if root.is_dir() and (root.suffix == ".zarr" or (root / "zarr.json").exists()):
        leftovers = [p for p in root.parent.iterdir() if p.is_dir() and st.leftover_target(p) == root]
        return [root], sorted(leftovers)
    if st.leftover_target(root) is not None:
        return [], [root]
    found, leftovers = [], []
    for dirpath, dirnames, _ in os.walk(root):
        keep = []
        for d in sorted(dirnames):
            p = Path(dirpath) / d
            if st.leftover_target(p) is not None:
                leftovers.append(p)
            elif d.endswith(".zarr"):
                found.append(p)
            elif d not in (".snakemake", ".git", "__pycache__"):
                keep.append(d)
        dirnames[:] = keep
    return found, leftovers


# --------------------------------------------------------------------------- checks


class _Checker:
    def __init__(self, path: Path, fp_cache: dict[str, str | None]):
        self.path, self.fp_cache = path, fp_cache
        self.problems: list[Problem] = []

    def add(self, msg: str, severity: str = "broken") -> None:
        self.problems.append(Problem(str(self.path), msg, severity))

    def slide_fingerprint(self, slide_path: str) -> str | None:
        if slide_path not in self.fp_cache:
            try:
                self.fp_cache[slide_path] = fingerprint(slide_path)
            except OSError:
                self.fp_cache[slide_path] = None
        return self.fp_cache[slide_path]

    def slide_matches(self, slide_path: str, recorded: str | None) -> bool | None:
        """Whether the slide file is the one `recorded` (None: the file cannot be read)."""
        current = self.slide_fingerprint(slide_path) if slide_path else None
        if current is None:
            return None
        try:
            return fingerprint_matches(slide_path, recorded, current)
        except OSError:
            return None


def _check_store(path: Path, fp_cache: dict[str, str | None]) -> tuple[str, list[Problem]]:
    c = _Checker(path, fp_cache)
    status, attrs = st.store_state(path)
    if status == "broken":
        c.add("broken: unreadable root metadata (zarr.json)")
        return "unreadable", c.problems
    kind = attrs.get("kind", "?")
    version = attrs.get("layout_version")
    if version != st.LAYOUT_VERSION:
        c.add(f"layout version {version!r}, expected {st.LAYOUT_VERSION} (rerun the stage to rewrite it)")
        return kind, c.problems
    if status == "failed":
        arrays = st.list_arrays(path) if kind in ("tiles", "features") else {}
        if not str(attrs.get("error", "")).strip():
            c.add("broken: status 'failed' but no error recorded (edited, or written by another tool); "
                  "delete it and rerun the stage")
        elif arrays:
            c.add(f"broken: status 'failed' but it holds {len(arrays)} data array(s) (status edited?); "
                  "delete it and rerun the stage")
        else:
            c.add(f"failed: {attrs['error']}", "failed")
        return "failed", c.problems
    if status != "ok":
        c.add(f"unknown status {status!r}")
        return kind, c.problems
    try:
        if kind == "tiles":
            _check_tiles(c, attrs)
        elif kind == "features":
            _check_features(c, attrs)
        else:
            c.add(f"unknown store kind {kind!r}")
    except Exception as e:  # unreadable chunk data, missing attributes: broken, never a crash
        c.add(f"unreadable: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return kind, c.problems


def _first(mask: np.ndarray) -> str:
    idx = np.flatnonzero(mask)[:_MAX_LISTED]
    return ", ".join(f"#{i}" for i in idx) + (", ..." if mask.sum() > _MAX_LISTED else "")


def _check_arrays(c: _Checker, mags: tuple[str, ...], specs: dict[str, st.ArraySpec],
                  n_tiles: dict[str, int]) -> tuple[dict[str, int], dict[str, st.ArrayInfo]]:
    """Required arrays present with their dtypes and consistent shapes; returns N per usable mag
    and the store's arrays (metadata)."""
    arrays = st.list_arrays(c.path)
    usable = {}
    for mag in mags:
        n_attr = n_tiles.get(mag)
        ok = True
        lengths = set()
        for key, spec in specs.items():
            name = f"{mag}/{key}"
            info = arrays.get(name)
            if info is None:
                c.add(f"{name}: array missing")
                ok = False
                continue
            if info.dtype != np.dtype(spec.dtype):
                c.add(f"{name}: dtype {info.dtype}, expected {np.dtype(spec.dtype)}")
                ok = False
            if not spec.fits(info.shape):
                c.add(f"{name}: shape {info.shape}, expected {spec.shape_text()}")
                ok = False
                continue
            lengths.add(info.shape[0])
        if len(lengths) > 1:
            c.add(f"{mag}: arrays disagree on the number of tiles: {sorted(lengths)}")
            ok = False
        elif lengths and n_attr is not None and lengths != {n_attr}:
            c.add(f"{mag}: {lengths.pop()} tiles in the arrays, {n_attr} in the attributes")
            ok = False
        if ok:
            usable[mag] = n_attr if n_attr is not None else lengths.pop()
    return usable, arrays


def _digest(coords: dict[str, np.ndarray]) -> str:
    return st.tiles_digest({m: SimpleNamespace(coords=v) for m, v in coords.items()})


def _check_tiles(c: _Checker, attrs: dict[str, Any]) -> None:
    meta = st.TileStoreMeta.from_attrs(attrs, c.path)
    mags = meta.magnifications
    usable, _ = _check_arrays(c, mags, st.TILE_ARRAYS, meta.n_tiles)
    width, height = (int(v) for v in meta.level0_size)
    region_rows, region_cols = (int(v) for v in meta.region_grid)
    threshold = float(meta.tiling["tissue_threshold"])
    tile_px = {m: float(v) for m, v in meta.tile_px_level0.items()}
    grid = Grid(tile_px.get(mags[0], 0.0) if mags else 0.0, len(mags), region_rows, region_cols)
    data = {m: {k: st.read_array(c.path, f"{m}/{k}") for k in st.TILE_ARRAYS} for m in usable}
    for i, mag in enumerate(mags):
        if mag not in data:
            continue
        d = data[mag]
        xy, rc, tissue, region = d["coords"], d["grid"].astype(np.int64), d["tissue"], d["region"].astype(np.int64)
        cpr = grid.cells_per_region(i)  # cells per region side at this magnification
        out = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
        if out.any():
            j = int(np.argmax(out))
            c.add(f"{mag}/coords: {int(out.sum())} tile(s) outside the slide (level-0 {width}x{height}), "
                  f"first #{j} at ({xy[j, 0]}, {xy[j, 1]})")
        expect = np.rint(rc[:, ::-1] * tile_px[mag]).astype(np.int64)
        off = (np.abs(xy - expect) > 1).any(1)
        if off.any():
            c.add(f"{mag}/coords: {int(off.sum())} tile(s) not on the grid ({tile_px[mag]:g} level-0 px per tile): {_first(off)}")
        bad_rc = (rc < 0).any(1) | (rc[:, 0] >= region_rows * cpr) | (rc[:, 1] >= region_cols * cpr)
        if bad_rc.any():
            c.add(f"{mag}/grid: {int(bad_rc.sum())} cell(s) outside the {region_rows * cpr}x{region_cols * cpr} grid: {_first(bad_rc)}")
        bad_t = ~np.isfinite(tissue) | (tissue < 0) | (tissue > 1)
        if bad_t.any():
            c.add(f"{mag}/tissue: {int(bad_t.sum())} value(s) outside [0, 1]: {_first(bad_t)}")
        low = ~bad_t & (tissue < threshold - 1e-6)
        if low.any():
            c.add(f"{mag}/tissue: {int(low.sum())} kept tile(s) below the threshold {threshold:g}: {_first(low)}")
        want_region = (rc[:, 0] // cpr) * region_cols + rc[:, 1] // cpr
        bad_r = region != want_region
        if bad_r.any():
            c.add(f"{mag}/region: {int(bad_r.sum())} tile(s) with a region that does not hold their cell: {_first(bad_r)}")
        dec = np.diff(region) < 0
        if dec.any():
            c.add(f"{mag}/region: not in region order (decreases after #{int(np.argmax(dec))})")
        else:
            key = (region * cpr + rc[:, 0] % cpr) * cpr + rc[:, 1] % cpr
            if (np.diff(key) <= 0).any():
                c.add(f"{mag}: tiles not in raster order inside their region, or duplicated "
                      f"(first after #{int(np.argmax(np.diff(key) <= 0))})")
    _check_parents(c, mags, data)
    digest = _digest({m: data[m]["coords"] for m in mags if m in data})
    if len(data) == len(mags) and digest != meta.tiles_sha256:
        c.add("tiles_sha256 does not match the stored coords (store modified after it was written)")
    slide_path = meta.slide_path
    same = c.slide_matches(slide_path, meta.slide_fingerprint)
    if same is None:
        c.add(f"stale: slide file not found ({slide_path or 'no slide_path recorded'})", "stale")
    elif not same:
        c.add(f"stale: slide changed since tiling ({slide_path})", "stale")


def _check_parents(c: _Checker, mags: tuple[str, ...], data: dict[str, dict[str, np.ndarray]]) -> None:
    for i, mag in enumerate(mags):
        if mag not in data:
            continue
        parent = data[mag]["parent"]
        if i == len(mags) - 1:
            if (parent != -1).any():
                c.add(f"{mag}/parent: the coarsest magnification links {int((parent != -1).sum())} tile(s) to a parent")
            continue
        up = mags[i + 1]
        if up not in data:
            continue
        child_rc, child_region = data[mag]["grid"].astype(np.int64), data[mag]["region"]
        par_rc, par_region = data[up]["grid"].astype(np.int64), data[up]["region"]
        n_up = len(par_rc)
        bad = (parent < -1) | (parent >= n_up)
        if bad.any():
            c.add(f"{mag}/parent: {int(bad.sum())} index(es) outside [-1, {n_up}): {_first(bad)}")
        linked = (parent >= 0) & ~bad
        j = parent[linked]
        wrong = np.zeros(len(parent), bool)
        wrong[linked] = (par_rc[j] != child_rc[linked] // 2).any(1) | (par_region[j] != child_region[linked])
        if wrong.any():
            c.add(f"{mag}/parent: {int(wrong.sum())} link(s) to a {up} tile that does not contain the child: {_first(wrong)}")
        # a kept parent cell must be linked
        cols = int(max(par_rc[:, 1].max(initial=0), (child_rc[:, 1] // 2).max(initial=0))) + 1
        keys = np.sort(par_rc[:, 0] * cols + par_rc[:, 1])
        want = child_rc[:, 0] // 2 * cols + child_rc[:, 1] // 2
        found = np.zeros(len(want), bool)
        if len(keys):
            found = keys[np.minimum(np.searchsorted(keys, want), len(keys) - 1)] == want
        missing = found & (parent == -1)
        if missing.any():
            c.add(f"{mag}/parent: {int(missing.sum())} tile(s) not linked to their kept {up} parent: {_first(missing)}")


def _tile_store_of(path: Path) -> Path:
    """`<results>/features/<encoder>/<slide>.zarr` -> `<results>/tiles/<slide>.zarr`."""
    return path.parent.parent.parent / "tiles" / path.name


def _check_features(c: _Checker, attrs: dict[str, Any]) -> None:
    meta = st.FeatureStoreMeta.from_attrs(attrs, c.path)
    mags = meta.magnifications
    damaged = st.chunk_problems(c.path)
    for msg in damaged:
        c.add(f"damaged chunk: {msg}")
    if damaged:
        return
    usable, arrays = _check_arrays(c, mags, st.FEATURE_ARRAYS, meta.n_tiles)
    dims = meta.dims
    copied: dict[str, dict[str, np.ndarray]] = {}
    for mag in usable:
        info = arrays[f"{mag}/features"]
        if dims.get(mag) != info.shape[1]:
            c.add(f"{mag}/features: {info.shape[1]} feature dims, {dims.get(mag)} in the attributes")
        failed = st.read_array(c.path, f"{mag}/failed")
        n_nonfinite, first_bad, zero_rows = 0, None, np.zeros(len(failed), bool)
        for start, rows in st.iter_array_rows(c.path, f"{mag}/features"):
            fin = np.isfinite(rows)
            if not fin.all():
                n_nonfinite += int((~fin).sum())
                if first_bad is None:
                    first_bad = start + int(np.argmax(~fin.all(1)))
            zero_rows[start : start + len(rows)] = ~rows.any(1)
        if n_nonfinite:
            c.add(f"{mag}/features: {n_nonfinite} non-finite value(s) (NaN/inf), first in tile #{first_bad}")
        lost = zero_rows & ~failed
        if lost.any():
            c.add(f"{mag}/features: {int(lost.sum())} all-zero row(s) not marked failed (lost chunk?): {_first(lost)}")
        copied[mag] = {k: st.read_array(c.path, f"{mag}/{k}") for k in st.COPIED_ARRAYS}
    tiles = _tile_store_of(c.path)
    t_status, t_attrs = st.store_state(tiles)
    if t_status != "ok":
        c.add(f"stale: its tile store is {t_status} ({tiles})", "stale")
        return
    t_meta = st.TileStoreMeta.from_attrs(t_attrs, tiles)
    if t_meta.tiles_sha256 != meta.tiles_sha256:
        c.add("stale: tiles changed since extraction", "stale")
    else:
        for mag, arrays in copied.items():
            for key, values in arrays.items():
                if mag not in t_meta.magnifications:
                    c.add(f"{mag}: not in the tile store")
                    break
                if not np.array_equal(values, st.read_array(tiles, f"{mag}/{key}")):
                    c.add(f"{mag}/{key}: differs from the tile store's (store modified after it was written)")
    if t_meta.slide_fingerprint != meta.slide_fingerprint:
        c.add("stale: slide changed since extraction (retiled from a different slide file)", "stale")
    elif c.slide_matches(t_meta.slide_path, meta.slide_fingerprint) is False:
        c.add("stale: slide changed since tiling", "stale")
