rule make_splits:
    input:
        sheet=get_sheet_path,
    output:
        f"{RESULTS}/splits/splits.tsv",
    log:
        f"{LOGS}/make_splits.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        folds=config["splits"]["folds"],
        val_fraction=config["splits"]["val_fraction"],
        seed=config["splits"]["seed"],
        code=code_fingerprint("splits"),
    shell:
        "python -m pipeline splits --sheet {input.sheet:q} --out {output:q} --folds {params.folds:q} "
        "--val-fraction {params.val_fraction:q} --seed {params.seed:q} > {log:q} 2>&1"


rule train_mil:
    input:
        sheet=get_sheet_path,
        splits=f"{RESULTS}/splits/splits.tsv",
        features=get_feature_stores,
    output:
        checkpoint=f"{MODELS}/{{model}}/{{fold}}/checkpoint.pt",
        history=f"{MODELS}/{{model}}/{{fold}}/history.tsv",
    log:
        f"{LOGS}/train_mil/{{model}}/{{fold}}.log",
    benchmark:
        f"{BENCH}/train_mil/{{model}}/{{fold}}.tsv"
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    params:
        features=feature_args(),
        training=training_json(),
        out=subpath(output.checkpoint, parent=True),
        code=code_fingerprint("train"),
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline train --sheet {input.sheet:q} --splits {input.splits:q} "
        "--fold {wildcards.fold:q} {params.features:q} --model {wildcards.model:q} "
        "--training {params.training:q} --out {params.out:q} > {log:q} 2>&1"


rule evaluate_mil:
    input:
        sheet=get_sheet_path,
        splits=f"{RESULTS}/splits/splits.tsv",
        checkpoint=f"{MODELS}/{{model}}/{{fold}}/checkpoint.pt",
    output:
        metrics=f"{MODELS}/{{model}}/{{fold}}/metrics.json",
        predictions=f"{MODELS}/{{model}}/{{fold}}/predictions.csv",
        attention=f"{MODELS}/{{model}}/{{fold}}/attention.npz",
    log:
        f"{LOGS}/evaluate_mil/{{model}}/{{fold}}.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        features=feature_args(),
        out=subpath(output.metrics, parent=True),
        code=code_fingerprint("evaluate"),
    shell:
        "OMP_NUM_THREADS={threads} python -m pipeline evaluate --sheet {input.sheet:q} --splits {input.splits:q} "
        "--fold {wildcards.fold:q} {params.features:q} --checkpoint {input.checkpoint:q} "
        "--out {params.out:q} > {log:q} 2>&1"


rule plot_roc:
    input:
        get_model_predictions,
    output:
        report(
            f"{METRICS}/roc_{{model}}.png",
            caption="../report/roc.rst",
            category="ROC curves",
            labels={"model": "{model}"},
        ),
    log:
        f"{LOGS}/plot_roc/{{model}}.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_fingerprint("plot-roc"),
    shell:
        "python -m pipeline plot-roc {input:q} --out {output:q} --title {wildcards.model:q} > {log:q} 2>&1"


rule summarize_metrics:
    input:
        metrics=get_metric_files,
        splits=f"{RESULTS}/splits/splits.tsv",
    output:
        table=report(
            f"{METRICS}/summary.tsv",
            caption="../report/metrics.rst",
            category="Metrics",
        ),
        per_fold=f"{METRICS}/per_fold.tsv",
    log:
        f"{LOGS}/summarize_metrics.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        reference=config["reference_model"],
        code=code_fingerprint("summarize-metrics"),
    shell:
        "python -m pipeline summarize-metrics {input.metrics:q} --splits {input.splits:q} "
        "--out {output.table:q} --per-fold {output.per_fold:q} --reference {params.reference:q} "
        "> {log:q} 2>&1"


rule plot_cross_attention:
    input:
        histories=get_histories,
        predictions=get_all_predictions,
    output:
        report(
            f"{METRICS}/cross_attention.png",
            caption="../report/cross_attention.rst",
            category="Metrics",
        ),
    log:
        f"{LOGS}/plot_cross_attention.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        models=expand(f"{MODELS}/{{model}}", model=config["models"]),
        n_groups=config["training"]["model"]["n_groups"],
        code=code_fingerprint("plot-cross-attention"),
    shell:
        "python -m pipeline plot-cross-attention {params.models:q} --n-groups {params.n_groups} "
        "--out {output:q} > {log:q} 2>&1"
