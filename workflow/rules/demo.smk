# Only defined when the demo is on, so it can never overwrite a user's sheet.
if config["demo"]["enabled"]:

    checkpoint make_demo_cohort:
        output:
            sheet=config["slides"],
        log:
            f"{LOGS}/make_demo_cohort.log",
        conda:
            "../../envs/tiling.yaml"
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        params:
            n=config["demo"]["n_slides"],
            seed=config["demo"]["seed"],
            scale=config["demo"]["scale"],
            out=subpath(output.sheet, parent=True),
            code=code_fingerprint("demo-cohort"),
        shell:
            "python -m pipeline demo-cohort --out {params.out:q} "
            "--n {params.n:q} --seed {params.seed:q} --scale {params.scale:q} > {log:q} 2>&1"
