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
        code=code_fingerprint("export-qupath"),
    shell:
        "python -m pipeline export-qupath {input.store:q} --mask {input.mask:q} {params.attention:q} "
        "--colour-model {params.colour_model:q} --out {output:q} > {log:q} 2>&1"
