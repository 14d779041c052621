rule export_qupath:
    input:
        store=f"{RESULTS}/tiles/{{slide}}.zarr",
        mask=f"{RESULTS}/qc/{{slide}}.mask.png",
        attention=get_attention_files,
    output:
        f"{RESULTS}/qupath/{{slide}}.geojson",
    log:
        f"{LOGS}/export_qupath/{{slide}}.log",
    conda:
        "../../envs/tiling.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        attention=get_attention_args,
        colour_model=config["heatmaps"]["model"],
        version=PIPELINE_VERSION,
    shell:
        "python -m pipeline export-qupath {input.store:q} --mask {input.mask:q} {params.attention} "
        "--colour-model {params.colour_model} --out {output:q} > {log} 2>&1"
