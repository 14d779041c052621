# Prediction on a deploy cohort with a trained run (config predict.run): every fold model of
# every complete model of the run, as an ensemble; slides whose stores disagree with the run's
# record are refused (refused.tsv), the others predicted.
if RUN is not None:

    rule predict_mil:
        input:
            sheet=get_sheet_path,
            tiles=get_tile_stores,
            features=get_feature_stores,
            checkpoints=get_run_checkpoints,
        output:
            predictions=f"{PREDICTIONS}/{{model}}/predictions.csv",
            metrics=f"{PREDICTIONS}/{{model}}/metrics.json",
            attention=f"{PREDICTIONS}/{{model}}/attention.npz",
            refused=f"{PREDICTIONS}/{{model}}/refused.tsv",
            scores=report(
                f"{PREDICTIONS}/{{model}}/scores.png",
                caption="../report/predict.rst",
                category="Predictions",
                labels={"model": "{model}", "figure": "ROC and scores"},
            ),
            heatmaps=report(
                directory(f"{PREDICTIONS}/{{model}}/heatmaps"),
                patterns=["{slide}.png"],
                caption="../report/predict_heatmap.rst",
                category="Predictions",
                labels={"model": "{model}", "figure": "heatmap {slide}"},
            ),
        log:
            f"{LOGS}/predict_mil/{{model}}.log",
        benchmark:
            f"{BENCH}/predict_mil/{{model}}.tsv"
        wildcard_constraints:
            model="|".join(sorted(RUN.models)),
        conda:
            "../../envs/training.yaml"
        threads: 1
        resources:
            mem_mb=8000,
            runtime=120,
        params:
            run=PREDICT_RUN,
            feature_set=RUN.feature_set,
            results=RESULTS,
            out=PREDICTIONS,
            weights=get_predict_weights_args,
            bootstrap=config["predict"]["bootstrap"],
            seed=config["predict"]["seed"],
            slides=get_predict_heatmap_slides_args,
            n=config["predict"]["heatmaps"]["n_auto"],
            code=code_fingerprint("predict"),
        shell:
            "OMP_NUM_THREADS={threads} python -m pipeline predict --run {params.run:q} "
            "--feature-set {params.feature_set:q} --models {wildcards.model:q} --sheet {input.sheet:q} "
            "--results {params.results:q} --out {params.out:q} {params.weights:q} "
            "--bootstrap {params.bootstrap:q} --seed {params.seed:q} {params.slides:q} "
            "--heatmap-n {params.n:q} > {log:q} 2>&1"

    rule summarize_predictions:
        input:
            expand(f"{PREDICTIONS}/{{model}}/metrics.json", model=sorted(RUN.models)),
        output:
            report(
                f"{PREDICTIONS}/summary.tsv",
                caption="../report/predict_summary.rst",
                category="Predictions",
            ),
        log:
            f"{LOGS}/summarize_predictions.log",
        conda:
            "../../envs/training.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        params:
            code=code_fingerprint("summarize-predictions"),
        shell:
            "python -m pipeline summarize-predictions {input:q} --out {output:q} > {log:q} 2>&1"
