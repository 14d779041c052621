# SimCLR on the cohort's own tiles (features.pretrain): one job per magnification, or `shared`.
rule pretrain_encoder:
    input:
        stores=get_tile_stores,
    output:
        weights=f"{RESULTS}/pretrain/{{group}}.pth",
        summary=f"{RESULTS}/pretrain/{{group}}.json",
    log:
        f"{LOGS}/pretrain_encoder/{{group}}.log",
    benchmark:
        f"{BENCH}/pretrain_encoder/{{group}}.tsv"
    conda:
        "../../envs/features.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=720,
        gpu=1,
    params:
        mags=get_pretrain_mags,
        epochs=PRETRAIN["epochs"],
        batch_size=PRETRAIN["batch_size"],
        crop=PRETRAIN["crop"],
        lr=PRETRAIN["lr"],
        temperature=PRETRAIN["temperature"],
        tiles_per_slide=PRETRAIN["tiles_per_slide"],
        seed=PRETRAIN["seed"],
        workers=get_loader_workers,
        code=code_fingerprint("pretrain"),
    shell:
        "python -m pipeline pretrain {input.stores:q} --mag {params.mags:q} --out {output.weights:q} "
        "--summary {output.summary:q} --epochs {params.epochs:q} --batch-size {params.batch_size:q} "
        "--crop {params.crop:q} --lr {params.lr:q} --temperature {params.temperature:q} "
        "--tiles-per-slide {params.tiles_per_slide:q} --seed {params.seed:q} "
        "--workers {params.workers:q} > {log:q} 2>&1"


rule extract_features:
    input:
        store=f"{RESULTS}/tiles/{{slide}}.zarr",
        slide=get_slide_path,
        weights=get_pretrained_weights,
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
