"""The slide sheet (TSV): read, normalise and validate it before any work starts.

Columns: `slide_id`, `path`, `label`, `patient_id`, optional `mpp` (µm/px override), `split`
(`train` / `test`, e.g. CAMELYON16's official test set), `site` (hospital / scanner, for the
cohort QC's batch-effect score) and `annotations` (a QuPath GeoJSON or ASAP XML file of the
slide). Relative paths are relative to the sheet's folder. Every problem is reported with its
row number. `label` may be left out (column or cells) for prediction: `require_label=False`.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SheetError

REQUIRED = ("slide_id", "path", "label", "patient_id")
OPTIONAL = ("mpp", "split", "site", "annotations")
SPLITS = ("train", "test")
_EXTRA = "\0extra"  # DictReader key of cells beyond the header
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class SlideRow:
    slide_id: str
    path: Path  # absolute
    label: str | None  # None only in a sheet read with require_label=False (prediction)
    patient_id: str
    mpp: float | None = None
    split: str | None = None
    site: str | None = None  # hospital / scanner / batch (cohort QC)
    annotations: Path | None = None  # absolute path of the slide's annotation file


ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")  # a folder of annotations: <slide_id><suffix>


def find_annotation(folder: str | Path, slide_id: str) -> Path | None:
    """The slide's annotation file in a folder of them (<slide_id>.geojson, .json or .xml: the
    first found), None when it has none: what the `annotations` column says for a sheet without one."""
    return next((f for f in (Path(folder) / f"{slide_id}{x}" for x in ANNOTATION_SUFFIXES) if f.is_file()), None)


def _cell(v: str | None) -> str:
    return (v or "").strip()


def parse_sheet(text: str, base: Path, check_files: bool = True, allowed_roots: list[Path] | None = None,
                labels: list[str] | None = None, require_label: bool = True) -> list[SlideRow]:
    """Rows of a sheet given as text; `base` resolves relative paths. Raises SheetError naming the row.

    `require_label=False` (prediction on new slides): the `label` column and its cells may be
    empty; a given label is still checked against `labels`.
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t", restkey=_EXTRA)
    header = [_cell(h) for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    dup = sorted({c for c in header if c and header.count(c) > 1})
    if dup:
        raise SheetError(f"slide sheet: column(s) {dup} appear more than once in the header")
    required = REQUIRED if require_label else tuple(c for c in REQUIRED if c != "label")
    missing = [c for c in required if c not in header]
    if missing:
        raise SheetError(f"slide sheet: missing column(s) {missing}; found {header}")
    unknown = [c for c in header if c and c not in REQUIRED + OPTIONAL]
    if unknown:
        raise SheetError(f"slide sheet: unknown column(s) {unknown}; allowed: {list(REQUIRED + OPTIONAL)}")
    rows: list[SlideRow] = []
    seen: dict[str, int] = {}
    roots = [r.resolve() for r in allowed_roots or []]
    for n, raw in enumerate(reader, start=2):  # row 1 is the header
        extra = [c for c in raw.pop(_EXTRA, None) or [] if _cell(c)]
        if extra:
            raise SheetError(f"slide sheet row {n}: {len(header) + len(extra)} or more cells, the header has "
                             f"{len(header)} columns (extra: {extra[:3]}); a tab too many?")
        rec = {k: _cell(v) for k, v in raw.items() if k}
        if not any(rec.values()):
            continue  # blank line
        where = f"slide sheet row {n}"
        sid = rec.get("slide_id", "")
        if not SAFE_ID.match(sid) or ".." in sid:
            raise SheetError(f"{where}: slide_id {sid!r} is not safe (letters, digits, '.', '_', '-'; no '/' or '..')")
        if sid in seen:
            raise SheetError(f"{where}: duplicate slide_id {sid!r} (first on row {seen[sid]})")
        seen[sid] = n
        for col in required:
            if not rec.get(col):
                raise SheetError(f"{where} ({sid}): empty {col}")
        path = Path(rec["path"]).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if roots and not any(path.is_relative_to(r) for r in roots):
            raise SheetError(f"{where} ({sid}): path {path} is outside the allowed roots {[str(r) for r in roots]}")
        if check_files and not path.exists():
            raise SheetError(f"{where} ({sid}): file not found: {path}")
        label = rec.get("label") or None
        if labels is not None and label is not None and label not in labels:
            raise SheetError(f"{where} ({sid}): label {rec['label']!r} is not one of {labels}")
        mpp = None
        if rec.get("mpp"):
            try:
                mpp = float(rec["mpp"])
            except ValueError:
                mpp = float("nan")
            if not (math.isfinite(mpp) and 0.01 <= mpp <= 100):
                raise SheetError(f"{where} ({sid}): mpp {rec['mpp']!r} is not a resolution in µm/px")
        split = rec.get("split") or None
        if split is not None and split not in SPLITS:
            raise SheetError(f"{where} ({sid}): split {split!r} must be one of {list(SPLITS)} or empty")
        annotations = None
        if rec.get("annotations"):
            annotations = Path(rec["annotations"]).expanduser()
            annotations = (annotations if annotations.is_absolute() else base / annotations).resolve()
            if check_files and not annotations.is_file():
                raise SheetError(f"{where} ({sid}): annotation file not found: {annotations}")
        rows.append(SlideRow(sid, path, label, rec["patient_id"], mpp, split, rec.get("site") or None, annotations))
    if not rows:
        raise SheetError("slide sheet: no slides")
    return rows


def read_sheet(path: str | Path, **kw) -> list[SlideRow]:
    """Read and validate the sheet at `path` (relative slide paths resolve against its folder)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SheetError(f"slide sheet {p}: {e}") from e
    return parse_sheet(text, p.parent.resolve(), **kw)
