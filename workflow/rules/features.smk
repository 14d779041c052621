rule extract_features:
    input:
        store=f"{RESULTS}/tiles/{{slide}}.zarr",
        slide=get_slide_path,
    output:
        store=directory(f"{RESULTS}/features/{{encoder}}/{{slide}}.zarr"),
    log:
        f"{LOGS}/extract_features/{{encoder}}/{{slide}}.log",
    benchmark:
        f"{BENCH}/extract_features/{{encoder}}/{{slide}}.tsv"
    conda:
        "../../envs/features.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=1,
    params:
        encoder=lookup(dpath="{encoder}", within=ENCODERS),
        weights=get_weights_arg,
        weights_sha256=get_weights_sha,
        mags=get_encoder_mags,
        batch_size=config["features"]["batch_size"],
        on_tile_error=config["features"]["on_tile_error"],
        compile=["--compile"] if config["features"]["compile"] else [],
        workers=get_loader_workers,
        code=code_fingerprint("extract"),
    shell:
        "python -m pipeline extract {input.store:q} --slide {input.slide:q} "
        "--encoder {params.encoder:q} {params.weights:q} --out {output.store:q} --mags {params.mags:q} "
        "--batch-size {params.batch_size:q} --workers {params.workers:q} "
        "--on-tile-error {params.on_tile_error:q} {params.compile:q} --record-failure > {log:q} 2>&1"
