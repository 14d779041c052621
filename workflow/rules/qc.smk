rule cohort_qc:
    input:
        sheet=get_sheet_path,
        features=get_feature_stores,
    output:
        outliers=report(
            f"{RESULTS}/qc/cohort_outliers.tsv",
            caption="../report/cohort_qc.rst",
            category="Cohort QC",
        ),
        table=f"{RESULTS}/qc/cohort_features.tsv",
        summary=f"{RESULTS}/qc/cohort_qc.json",
        figure=report(
            f"{RESULTS}/qc/cohort_pca.svg",
            caption="../report/cohort_qc.rst",
            category="Cohort QC",
        ),
    log:
        f"{LOGS}/cohort_qc.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        features=feature_args(),
        min_tiles=config["qc"]["min_tiles"],
        outlier_z=config["qc"]["outlier_z"],
        out_dir=subpath(output.outliers, parent=True),
        code=code_fingerprint("cohort-qc"),
    shell:
        "python -m pipeline cohort-qc --sheet {input.sheet:q} {params.features:q} "
        "--out-dir {params.out_dir:q} --min-tiles {params.min_tiles:q} "
        "--outlier-z {params.outlier_z:q} --workers {threads} > {log:q} 2>&1"
