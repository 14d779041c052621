rule summarize_failures:
    input:
        tiles=get_tile_stores,
        features=get_feature_stores,
    output:
        slides=f"{RESULTS}/slides.tsv",
        failed=report(
            f"{RESULTS}/failed_slides.tsv",
            caption="../report/failed.rst",
            category="Slides",
        ),
    log:
        f"{LOGS}/summarize_failures.log",
    conda:
        "../../envs/tiling.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_fingerprint("summarize-tiles"),
    shell:
        "python -m pipeline summarize-tiles {input.tiles:q} {input.features:q} --out {output.slides:q} "
        "--failed {output.failed:q} > {log:q} 2>&1"


rule plot_heatmaps:
    input:
        attention=f"{MODELS}/{{model}}/{{fold}}/attention.npz",
        predictions=f"{MODELS}/{{model}}/{{fold}}/predictions.csv",
        tiles=get_tile_stores,
    output:
        report(
            directory(f"{RESULTS}/heatmaps/{FEATURESET}/{{model}}/{{fold}}"),
            patterns=["{slide}.png"],
            caption="../report/heatmap.rst",
            category="Attention heatmaps",
            labels={"model": "{model}", "fold": "{fold}", "slide": "{slide}"},
        ),
    log:
        f"{LOGS}/plot_heatmaps/{{model}}/{{fold}}.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        slides=get_heatmap_slides_arg(),
        n=config["heatmaps"]["n_auto"],
        tiles_dir=f"{RESULTS}/tiles",
        fold_dir=subpath(input.attention, parent=True),
        code=code_fingerprint("heatmaps"),
    shell:
        "python -m pipeline heatmaps --fold-dir {params.fold_dir:q} "
        "--tiles-dir {params.tiles_dir:q} --out {output:q} {params.slides:q} --n {params.n:q} > {log:q} 2>&1"


rule write_manifest:
    input:
        sheet=get_sheet_path,
    output:
        f"{METRICS}/manifest.json",
    log:
        f"{LOGS}/write_manifest.log",
    conda:
        "../../envs/tiling.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        config=json.dumps(config),
        weights=get_all_weights_sha,
        repo=workflow.basedir,
        code=code_fingerprint("manifest"),
    shell:
        "python -m pipeline manifest --config-json {params.config:q} --sheet {input.sheet:q} "
        "--repo {params.repo:q} --weights-sha256 {params.weights:q} --out {output:q} > {log:q} 2>&1"


rule evaluate_lesions:
    input:
        sheet=get_sheet_path,
        features=get_feature_stores,
        attention=get_attention_files,
        annotations=get_lesion_annotation_files,
    output:
        probe=f"{LESIONS}/lesion_probe.tsv",
        table=f"{LESIONS}/lesion_attention.tsv",
        figure=report(
            f"{LESIONS}/lesion_attention.png",
            caption="../report/lesions.rst",
            category="Lesions",
        ),
        summary=f"{LESIONS}/lesion_eval.json",
    log:
        f"{LOGS}/evaluate_lesions.log",
    conda:
        "../../envs/training.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        annotations=get_lesion_args,
        normal=config["annotations"]["normal_label"],
        features=feature_args,
        attention=get_attention_args,
        out=subpath(output.summary, parent=True),
        code=code_fingerprint("evaluate-lesions"),
    shell:
        "python -m pipeline evaluate-lesions --sheet {input.sheet:q} {params.annotations:q} "
        "--normal-label {params.normal:q} {params.features:q} {params.attention:q} "
        "--out-dir {params.out:q} > {log:q} 2>&1"
