# Multi-magnification WSI classification: tiling -> features -> M2OTCA and baselines -> report.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tiling.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/qupath.smk"
include: "workflow/rules/predict.smk"


rule all:
    default_target: True
    input:
        get_final_output,


rule tiles:
    input:
        get_tile_outputs,


rule features:
    input:
        get_feature_stores,


rule train:
    input:
        get_training_outputs,


rule tiles_summary:
    input:
        f"{RESULTS}/tiles/summary.tsv",


# Apply a trained run to new slides: snakemake predict --configfile <deploy config>
rule predict:
    input:
        get_predict_outputs,


rule feature_qc:
    input:
        get_cohort_qc_outputs,


rule qupath:
    input:
        get_qupath_outputs,


onsuccess:
    print_run_summary()
