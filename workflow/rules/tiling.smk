rule tile_slide:
    input:
        slide=get_slide_path,
        annotations=get_annotation_input,
    output:
        store=directory(f"{RESULTS}/tiles/{{slide}}.zarr"),
        qc=report(
            f"{RESULTS}/qc/{{slide}}.png",
            caption="../report/qc.rst",
            category="Slide QC",
            labels={"slide": "{slide}"},
        ),
        mask=f"{RESULTS}/qc/{{slide}}.mask.png",
    log:
        f"{LOGS}/tile_slide/{{slide}}.log",
    benchmark:
        f"{BENCH}/tile_slide/{{slide}}.tsv"
    conda:
        "../../envs/tiling.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        mpp=get_tile_slide_args,
        tiling=tiling_json(),
        code=code_fingerprint("tile"),
    shell:
        "python -m pipeline tile {input.slide:q} --out {output.store:q} --slide-id {wildcards.slide:q} "
        "{params.mpp:q} --tiling {params.tiling:q} --qc {output.qc:q} --mask {output.mask:q} "
        "--record-failure > {log:q} 2>&1"


rule summarize_tiles:
    input:
        stores=get_tile_stores,
    output:
        table=report(
            f"{RESULTS}/tiles/summary.tsv",
            caption="../report/tiles.rst",
            category="Slides",
        ),
    log:
        f"{LOGS}/summarize_tiles.log",
    conda:
        "../../envs/tiling.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_fingerprint("summarize-tiles"),
    shell:
        "python -m pipeline summarize-tiles {input.stores:q} --out {output.table:q} > {log:q} 2>&1"
