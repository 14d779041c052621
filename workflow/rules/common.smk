import functools
import json
import os
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from pipeline import provenance
from pipeline.hashing import file_sha256
from pipeline.config import check_model_options
from pipeline.slides.sheet import SAFE_ID, SlideRow, find_annotation, read_sheet
from pipeline.mil.splits import check_splittable

# Nothing here may import torch (or any module that does): this runs in the Snakemake process.
# training.model first: ModelConfig names a wrong key or value in one line with the allowed ones
check_model_options((config.get("training") or {}).get("model") or {})
validate(config, schema="../schemas/config.schema.yaml")

# envs/*.post-deploy.sh install this package into each rule's env (--sdm conda) from here.
os.environ.setdefault("M2OTCA_PIPELINE_SRC", workflow.basedir)

COHORT = config["cohort"]
RESULTS = f"results/{COHORT}"
LOGS = f"logs/{COHORT}"
BENCH = f"benchmarks/{COHORT}"

# A deploy config (predict.run set) applies a trained run to this cohort: its slides are tiled
# and extracted with the run's RECORDED tiling parameters, encoders and weights (read from its
# stores, checkpoints and manifest), whatever the tiling/features blocks say.
PREDICT_RUN = config["predict"]["run"]
RUN = None
if PREDICT_RUN:
    from pipeline.deploy.trained_run import load_trained_run

    if Path(PREDICT_RUN).resolve() == Path(RESULTS).resolve():
        raise ValueError(
            f"predict.run {PREDICT_RUN} is this cohort's own results folder; give the deploy cohort another name"
        )
    RUN = load_trained_run(
        PREDICT_RUN,
        config["predict"]["feature_set"],
        config["predict"]["models"] or None,
        config["predict"]["weights"],
    )
    config["tiling"] = RUN.tiling
    config["features"]["encoders"] = dict(RUN.encoders)
    config["features"]["weights"] = dict(RUN.weights)


wildcard_constraints:
    slide=SAFE_ID.pattern.removeprefix("^").removesuffix("$"),


@functools.cache
def code_fingerprint(command, *extra):
    """Fingerprint of the code `python -m pipeline <command>` runs (cli function + the package
    modules it imports, read as files, never imported), plus `extra` files (e.g. a script).
    As a param (`code=code_fingerprint("tile")`) it reruns the jobs whose code changed.
    """
    return provenance.code_fingerprint(command, extra)


def demo_pending():
    """True when the demo cohort is configured and its sheet is not written yet."""
    return config["demo"]["enabled"] and not Path(config["slides"]).exists()


def get_sheet():
    """Validated slide sheet as a DataFrame indexed by slide_id (after the demo checkpoint)."""
    if config["demo"]["enabled"]:
        checkpoints.make_demo_cohort.get()
    return _load_sheet(config["slides"])


@functools.cache
def _load_sheet(path):
    """The sheet, validated once by pipeline.slides.sheet (the CLI's own check, errors naming the row)."""
    rows = read_sheet(
        config["slides"],
        allowed_roots=[Path(r) for r in config["allowed_roots"]] or None,
        require_label=RUN is None,  # a deploy cohort's sheet may have no labels
        labels=RUN.classes if RUN is not None else None,
    )
    sheet = pd.DataFrame(
        [
            {
                "slide_id": r.slide_id,
                "path": str(r.path),
                "label": r.label,
                "patient_id": r.patient_id,
                "mpp": r.mpp,
                "split": r.split,
                "site": r.site,
                "annotations": str(r.annotations) if r.annotations else None,
            }
            for r in rows
        ]
    ).set_index("slide_id", drop=False)
    return sheet


def get_sheet_rows():
    """The validated sheet as SlideRow records (for the checks the pipeline's library makes)."""
    return [
        SlideRow(
            r.slide_id,
            Path(r.path),
            r.label,
            r.patient_id,
            None,
            r.split if isinstance(r.split, str) and r.split else None,
        )
        for r in get_sheet().itertuples(index=False)
    ]


def get_slide_path(wildcards):
    return get_sheet().loc[wildcards.slide, "path"]


def get_mpp_arg(wildcards):
    """`--mpp X` when the sheet overrides the slide's resolution (a list: quote it with :q)."""
    mpp = get_sheet().loc[wildcards.slide, "mpp"]
    return [] if pd.isna(mpp) else ["--mpp", str(mpp)]


def tiling_json():
    return json.dumps(config["tiling"])


def get_annotation_input(wildcards):
    """The slide's annotation file when include/exclude classes restrict tiling, else nothing."""
    ann = config["annotations"]
    path = get_sheet().loc[wildcards.slide, "annotations"]
    return (
        [path]
        if path and not pd.isna(path) and (ann["include"] or ann["exclude"])
        else []
    )


def get_tile_slide_args(wildcards):
    """tile_slide's per-slide options: the mpp override and, when the slide has an annotation file
    and include/exclude classes are set, its regions. One param (`mpp`), so a slide without
    either keeps the provenance recorded before annotations existed (no re-tiling on upgrade).
    """
    args = get_mpp_arg(wildcards)
    files = get_annotation_input(wildcards)
    if files:
        ann = config["annotations"]
        args += ["--annotations", files[0], "--include", ",".join(ann["include"])]
        args += ["--exclude", ",".join(ann["exclude"])]
    return args  # a list: quote it with :q


def get_tile_stores(wildcards=None):
    return expand(f"{RESULTS}/tiles/{{slide}}.zarr", slide=get_sheet().index)


def get_tile_outputs(wildcards=None):
    return get_tile_stores() + expand(
        f"{RESULTS}/qc/{{slide}}.png", slide=get_sheet().index
    )


def encoder_dir(name):
    """Folder name of an encoder's feature stores (`timm:x` -> `timm-x`)."""
    return name.replace(":", "-")


ENCODERS = {encoder_dir(n): n for n in config["features"]["encoders"].values()}
# Models are trained on a feature set (the encoder serving each magnification): its name keeps
# the results of different encoder choices of one cohort apart.
FEATURESET = (
    next(iter(ENCODERS))
    if len(ENCODERS) == 1
    else "_".join(
        f"{m}-{encoder_dir(e)}" for m, e in config["features"]["encoders"].items()
    )
)
MODELS = f"{RESULTS}/models/{FEATURESET}"
METRICS = f"{RESULTS}/metrics/{FEATURESET}"
LESIONS = f"{RESULTS}/lesions/{FEATURESET}"


wildcard_constraints:
    encoder="|".join(ENCODERS) or "none",


@functools.cache
def weights_sha256(path):
    return file_sha256(path) if path else "random-init"


PRETRAIN = config["features"]["pretrain"]


def _check_weights_keys():
    """features.weights keys: an encoder in use (every magnification it serves) or a magnification."""
    encoders, mags = config["features"]["encoders"], config["tiling"]["magnifications"]
    odd = [
        k
        for k in config["features"]["weights"]
        if k not in mags and k not in encoders.values()
    ]
    if odd:
        raise ValueError(
            f"features.weights: {odd} are neither an encoder in features.encoders "
            f"({sorted(set(encoders.values()))}) nor a magnification ({list(mags)})"
        )


def _pretrain_groups():
    """Pretraining job (`shared` or a magnification) -> the magnifications it serves: the
    resnet18_simclr magnifications without weights in the config."""
    if RUN is not None or not PRETRAIN["enabled"]:
        return {}
    w = config["features"]["weights"]
    mags = [
        m
        for m, e in config["features"]["encoders"].items()
        if e == "resnet18_simclr" and not (w.get(m) or w.get(e))
    ]
    if not mags:
        return {}
    return {m: [m] for m in mags} if PRETRAIN["per_magnification"] else {"shared": mags}


_check_weights_keys()
PRETRAIN_GROUPS = _pretrain_groups()
# Pretrained magnifications take the pretrain_encoder rule's output as their weights (so the
# manifest records them, and a deploy config finds them under the magnification's key).
for _group, _mags in PRETRAIN_GROUPS.items():
    for _m in _mags:
        config["features"]["weights"][_m] = f"{RESULTS}/pretrain/{_group}.pth"
PRETRAINED = {
    f"{RESULTS}/pretrain/{g}.pth": g for g in PRETRAIN_GROUPS
}  # weights file -> its job


wildcard_constraints:
    group="|".join(PRETRAIN_GROUPS) or "none",


def weights_of(mag):
    """A magnification's weights file ("" = random init): its own key, else its encoder's."""
    w, enc = config["features"]["weights"], config["features"]["encoders"][mag]
    return (w[mag] if mag in w else w.get(enc)) or ""


def get_weights(wildcards):
    """Magnification -> weights file of the magnifications this encoder serves."""
    return {m: weights_of(m) for m in get_encoder_mags(wildcards).split(",")}


def get_weights_arg(wildcards):
    """`--weights FILE`, or `--weights MAG=FILE` per magnification when they differ (a list: :q)."""
    files = get_weights(wildcards)
    if len(set(files.values())) == 1:
        w = next(iter(files.values()))
        return ["--weights", w] if w else []
    return [a for m, f in files.items() for a in ("--weights", f"{m}={f}")]


def get_pretrained_weights(wildcards):
    """The pretrain_encoder outputs this extraction reads (so it waits for them)."""
    return sorted({f for f in get_weights(wildcards).values() if f in PRETRAINED})


def weights_id(path):
    """sha256 of a weights file; a pretraining output (not there yet when the DAG is built) is
    named by its job's parameters instead, so the value never changes once it is written.
    """
    if path in PRETRAINED:
        return f"pretrain:{PRETRAINED[path]}:{json.dumps(PRETRAIN, sort_keys=True)}"
    return weights_sha256(path)


def get_weights_sha(wildcards):
    """One id when the encoder's magnifications share their weights (as before), else per magnification."""
    ids = {m: weights_id(f) for m, f in get_weights(wildcards).items()}
    return next(iter(ids.values())) if len(set(ids.values())) == 1 else json.dumps(ids)


def get_pretrain_mags(wildcards):
    return ",".join(PRETRAIN_GROUPS[wildcards.group])


def get_pretrain_outputs(wildcards=None):
    return list(PRETRAINED)


def get_loader_workers(wildcards, threads):
    """Decoding workers: half the job's threads (decode is ~10x cheaper than a CPU encoder;
    give extract_features more threads on GPU nodes to feed the device)."""
    return max(1, threads // 2)


def get_encoder_mags(wildcards):
    """Magnifications this encoder serves (an encoder per magnification is allowed)."""
    name = ENCODERS[wildcards.encoder]
    return ",".join(m for m, e in config["features"]["encoders"].items() if e == name)


def get_feature_stores(wildcards=None):
    return expand(
        f"{RESULTS}/features/{{encoder}}/{{slide}}.zarr",
        encoder=list(ENCODERS),
        slide=get_sheet().index,
    )


def get_final_output(wildcards=None):
    """Everything of a training run; for a deploy config (predict.run), its predictions."""
    if RUN is not None:
        return get_predict_outputs()
    return (
        get_tile_outputs()
        + [f"{RESULTS}/tiles/summary.tsv"]
        + get_feature_stores()
        + get_training_outputs()
        + [f"{RESULTS}/failed_slides.tsv", f"{METRICS}/manifest.json"]
        + get_cohort_qc_outputs()
        + get_qupath_outputs()
        + get_lesion_outputs()
    )


PREDICTIONS = f"{RESULTS}/predictions/{RUN.feature_set if RUN else FEATURESET}"


def get_predict_models(wildcards=None):
    if RUN is None:
        raise ValueError(
            "the predict target needs a deploy config naming a trained run (predict.run), "
            "e.g. snakemake predict --configfile cohorts/demo_deploy.yaml"
        )
    return sorted(RUN.models)


def get_run_checkpoints(wildcards):
    """The trained run's fold checkpoints of one model (inputs: a new fold model reruns prediction)."""
    return [str(p) for p in RUN.models[wildcards.model]]


def get_predict_weights_args(wildcards=None):
    """`--weights NAME=FILE` per moved weights file (a list: quote it with :q)."""
    return [
        a
        for n, w in config["predict"]["weights"].items()
        if w
        for a in ("--weights", f"{n}={w}")
    ]


def get_predict_outputs(wildcards=None):
    models = get_predict_models()
    return (
        expand(f"{PREDICTIONS}/{{model}}/predictions.csv", model=models)
        + expand(f"{PREDICTIONS}/{{model}}/heatmaps", model=models)
        + [f"{PREDICTIONS}/summary.tsv", f"{RESULTS}/failed_slides.tsv"]
        + get_cohort_qc_outputs()
        + get_qupath_outputs()
    )


def get_predict_heatmap_slides_args(wildcards=None):
    """`--heatmap-slides A,B` when slides are named (a list: quote it with :q)."""
    slides = config["predict"]["heatmaps"]["slides"]
    return ["--heatmap-slides", ",".join(slides)] if slides else []


def get_cohort_qc_outputs(wildcards=None):
    return [f"{RESULTS}/qc/cohort_outliers.tsv", f"{RESULTS}/qc/cohort_pca.svg"]


def get_lesion_outputs(wildcards=None):
    """The lesion evaluation of a training run: when lesion classes are named and annotations
    given (a folder, or the sheet's column for at least one slide)."""
    ann = config["annotations"]
    if RUN is not None or not ann["lesion_classes"]:
        return []
    # after the demo's checkpoint, which writes the demo's annotations
    sheet = get_sheet()
    if ann["dir"] and not Path(ann["dir"]).is_dir():
        raise ValueError(
            f"annotations.dir {ann['dir']}: no such folder "
            "(annotations.lesion_classes: [] skips the lesion evaluation)"
        )
    if not ann["dir"] and not sheet["annotations"].notna().any():
        return []
    return [f"{LESIONS}/lesion_eval.json", f"{LESIONS}/lesion_attention.png"]


def get_lesion_annotation_files(wildcards=None):
    """The annotation files the lesion evaluation reads, so that a changed one reruns it: each
    slide's in annotations.dir when set, else the sheet's annotations column."""
    ann = config["annotations"]
    sheet = get_sheet()
    if ann["dir"]:
        found = (find_annotation(ann["dir"], s) for s in sheet.index)
        return sorted(str(f) for f in found if f)
    return sorted(str(p) for p in sheet["annotations"].dropna().unique())


def get_lesion_args(wildcards=None):
    """evaluate-lesions' annotation options (a list: quote it with :q): the lesion classes, those
    cut out of lesions, and the folder of annotations when set (else the sheet's column).
    """
    ann = config["annotations"]
    args = ["--lesion-classes", ",".join(ann["lesion_classes"])]
    if ann["non_lesion_classes"]:
        args += ["--non-lesion-classes", ",".join(ann["non_lesion_classes"])]
    return args + (["--annotations-dir", ann["dir"]] if ann["dir"] else [])


def get_qupath_outputs(wildcards=None):
    if not config["qupath"]["export"]:
        return []
    return expand(f"{RESULTS}/qupath/{{slide}}.geojson", slide=get_sheet().index)


def get_attention_files(wildcards=None):
    """attention.npz of every model: the evaluation folds (training) or the predictions (deploy)."""
    if RUN is not None:
        return expand(
            f"{PREDICTIONS}/{{model}}/attention.npz", model=sorted(RUN.models)
        )
    return expand(
        f"{MODELS}/{{model}}/{{fold}}/attention.npz",
        model=config["models"],
        fold=get_fold_names(),
    )


def get_attention_args(wildcards=None):
    """`--attention MODEL=FILE` per attention.npz (a list: quote it with :q)."""
    return [
        a
        for f in get_attention_files()
        for a in ("--attention", f"{Path(f).parts[-3 if RUN is None else -2]}={f}")
    ]


def get_fold_names(wildcards=None):
    return [f"fold_{i}" for i in range(config["splits"]["folds"])]


def get_sheet_path(wildcards=None):
    return config["slides"]


def feature_args(wildcards=None):
    """`--features MAG=DIR` for every magnification, from the encoder serving it (a list: :q)."""
    return [
        arg
        for mag, enc in config["features"]["encoders"].items()
        for arg in ("--features", f"{mag}={RESULTS}/features/{encoder_dir(enc)}")
    ]


def training_json():
    return json.dumps(config["training"])


def get_metric_files(wildcards=None):
    return expand(
        f"{MODELS}/{{model}}/{{fold}}/metrics.json",
        model=config["models"],
        fold=get_fold_names(),
    )


def get_histories(wildcards=None):
    return expand(
        f"{MODELS}/{{model}}/{{fold}}/history.tsv",
        model=config["models"],
        fold=get_fold_names(),
    )


def get_all_predictions(wildcards=None):
    return expand(
        f"{MODELS}/{{model}}/{{fold}}/predictions.csv",
        model=config["models"],
        fold=get_fold_names(),
    )


def get_model_predictions(wildcards):
    return expand(
        f"{MODELS}/{wildcards.model}/{{fold}}/predictions.csv",
        fold=get_fold_names(),
    )


def get_all_weights_sha(wildcards=None):
    """Encoder (and per-magnification) weights -> sha256 (a pretraining output: its job)."""
    keys = list(ENCODERS.values()) + [
        m
        for m in config["tiling"]["magnifications"]
        if m in config["features"]["weights"]
    ]
    return json.dumps(
        {k: weights_id(config["features"]["weights"].get(k) or "") for k in keys}
    )


def get_heatmap_slides_arg():
    """`--slides a,b` for the configured heatmap slides, nothing when none (a list: :q)."""
    slides = config["heatmaps"]["slides"]
    return ["--slides", ",".join(slides)] if slides else []


def get_heatmap_outputs(wildcards=None):
    model = config["heatmaps"]["model"]
    if (
        model not in config["models"]
        or config["heatmaps"]["n_auto"] + len(config["heatmaps"]["slides"]) == 0
    ):
        return []
    return expand(
        f"{RESULTS}/heatmaps/{FEATURESET}/{model}/{{fold}}", fold=get_fold_names()
    )


def get_training_outputs(wildcards=None):
    # before any job: a sheet that cannot give the configured folds fails now, not after tiling
    check_splittable(get_sheet_rows(), config["splits"]["folds"])
    return (
        [f"{METRICS}/summary.tsv", f"{METRICS}/cross_attention.png"]
        + expand(f"{METRICS}/roc_{{model}}.png", model=config["models"])
        + get_heatmap_outputs()
    )


def print_run_summary():
    """After a successful run: the metrics table, failed slides, and how to build the report."""
    predicted = Path(f"{PREDICTIONS}/summary.tsv")
    if RUN is not None and predicted.exists():
        table = pd.read_csv(predicted, sep="\t", keep_default_na=False)
        cols = [
            "model",
            "slides",
            "labelled",
            "refused",
            "auc_ci95",
            "balanced_acc_ci95",
        ]
        print(
            f"\nPredictions of {RUN.root} ({predicted}):\n{table[cols].to_string(index=False)}"
        )
    summary = Path(f"{METRICS}/summary.tsv")
    if RUN is None and summary.exists():
        table = pd.read_csv(summary, sep="\t")
        cols = ["model", "auc", "acc", "balanced_acc", "f1"] + [
            c for c in table.columns if c.startswith(("p_", "test_"))
        ]
        print(f"\nTest metrics ({summary}):\n{table[cols].to_string(index=False)}")
    failed = Path(f"{RESULTS}/failed_slides.tsv")
    if failed.exists() and len(pd.read_csv(failed, sep="\t")):
        print(f"\nFailed slides: {failed}")
    print(f"\nHTML report: snakemake --report {RESULTS}/report.html")
