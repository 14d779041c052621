"""Deterministic synthetic H&E-like demo cohort: pyramidal JPEG TIFFs at 0.5 µm/px plus a sheet.

Slides are painted as haematoxylin/eosin concentration maps on glass
(:mod:`pipeline.synthetic.he_painting`); "tumor" slides add lesions of varying size (some
small), whose contours become the cohort's lesion annotations. Geometry comes only from a numpy
Generator seeded by (seed, slide index): same seed, same bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from pipeline.atomic import atomic_path, write_text
from pipeline.synthetic.he_painting import render_slide
from pipeline.synthetic.slides import array_tile_fn, level_shapes, write_pyramid_tiff

MPP = 0.5  # level-0 µm/px (a 20x scan)
SIZE_W, SIZE_H = (7200, 9000), (5900, 7400)  # level-0 px at scale 1: ~320 kept 20x tiles per slide
SHEET_NAME = "slides.tsv"
LESIONS_NAME = "lesions.json"
LESION_CLASS = "Tumor"  # class of the demo's lesion annotations (config annotations.lesion_classes)
ANNOTATIONS_DIR = "annotations"  # <cohort>/annotations/<slide>.geojson, one per tumour slide


def write_slide(path: Path, seed: int, index: int, tumor: bool, scale: float = 1.0) -> list:
    """Render slide `index` of the cohort `seed` and write it as a 3+-level pyramidal TIFF."""
    rng = np.random.default_rng([seed, index])
    w = max(256, round(rng.uniform(*SIZE_W) * scale))
    h = max(256, round(rng.uniform(*SIZE_H) * scale))
    rgb, contours = render_slide(rng, h, w, tumor)
    shapes = level_shapes((h, w), None, 4)
    levels = [rgb] + [cv2.resize(rgb, (s[1], s[0]), interpolation=cv2.INTER_AREA) for s in shapes[1:]]
    write_pyramid_tiff(path, (h, w), array_tile_fn(levels), mpp=MPP, n_levels=len(shapes),
                       description=f"pipeline.synthetic.demo synthetic H&E; mpp={MPP}; seed={seed}; slide={index}",
                       maxworkers=1)
    return contours


def make_demo_cohort(out_dir: Path, n_slides: int = 24, seed: int = 0, scale: float = 1.0,
                     workers: int | None = None) -> Path:
    """Write `n_slides` synthetic slides under out_dir/slides/ and the sheet; return the sheet path.

    The sheet (TSV: slide_id, path, label, patient_id) lists paths RELATIVE TO THE SHEET'S FOLDER,
    so the cohort folder can be moved. Half the slides (rounded down) are "tumor"; some patients
    have two slides of the same label. Lesion contours (level-0 px) go to lesions.json.
    `scale` multiplies the slide sides (0.3 gives tiny CI slides); `workers` threads render.
    """
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1_000_003])
    labels = rng.permutation(["tumor"] * (n_slides // 2) + ["normal"] * (n_slides - n_slides // 2))
    ids = [f"demo_{i:03d}" for i in range(n_slides)]
    patients, last = [], {}
    for i, lab in enumerate(labels):  # ~1 in 4 slides shares the patient of the previous same-label slide
        prev = last.get(lab)
        if prev is not None and patients.count(prev) == 1 and rng.random() < 0.25:
            patients.append(prev)
        else:
            patients.append(f"P{i:03d}")
        last[lab] = patients[-1]
    jobs = ([out_dir / "slides" / f"{s}.tiff" for s in ids], [seed] * n_slides, range(n_slides),
            [lab == "tumor" for lab in labels], [scale] * n_slides)
    workers = workers or min(2, os.cpu_count() or 1)
    if workers > 1 and n_slides > 1:  # one slide per thread; the bytes do not depend on workers
        # threads, not processes: OpenCV/numpy release the GIL, and forking a process whose
        # OpenCV/torch thread pools are live can deadlock (spawn would need a __main__ guard)
        with ThreadPoolExecutor(workers) as ex:
            contours = list(ex.map(write_slide, *jobs))
    else:
        contours = list(map(write_slide, *jobs))
    lesions = {s: c for s, c in zip(ids, contours, strict=True)}
    write_text(out_dir / LESIONS_NAME, json.dumps({"mpp": MPP, "coords": "level-0 px, x y", "lesions": lesions}))
    write_lesion_geojson(out_dir)
    sheet = out_dir / SHEET_NAME
    with atomic_path(sheet) as tmp, open(tmp, "w", newline="") as f:
        wr = csv.writer(f, delimiter="\t", lineterminator="\n")
        wr.writerow(["slide_id", "path", "label", "patient_id"])
        for s, lab, p in zip(ids, labels, patients, strict=True):
            wr.writerow([s, f"slides/{s}.tiff", lab, p])
    return sheet


def write_lesion_geojson(out_dir: Path) -> dict[str, Path]:
    """QuPath GeoJSON of each tumour slide's lesions (class `Tumor`, from lesions.json) under
    out_dir/annotations/, so lesion evaluations read the demo like any annotated cohort."""
    from shapely import make_valid
    from shapely.geometry import Polygon, mapping

    out_dir = Path(out_dir)
    lesions = json.loads((out_dir / LESIONS_NAME).read_text())["lesions"]
    out = {}
    for sid, contours in lesions.items():
        if not contours:
            continue
        feats = [{"type": "Feature", "geometry": mapping(make_valid(Polygon(c))),  # contours may self-touch
                  "properties": {"objectType": "annotation", "classification": {"name": LESION_CLASS}}}
                 for c in contours]
        out[sid] = out_dir / ANNOTATIONS_DIR / f"{sid}.geojson"
        out[sid].parent.mkdir(parents=True, exist_ok=True)
        write_text(out[sid], json.dumps({"type": "FeatureCollection", "features": feats}))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.synthetic.demo --out DIR [--n N] [--seed S] [--scale X]`: write the cohort."""
    ap = argparse.ArgumentParser(description="Write the synthetic demo cohort.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args(argv)
    print(make_demo_cohort(a.out, a.n, a.seed, a.scale))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
