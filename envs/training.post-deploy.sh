#!/usr/bin/env bash
# Run by Snakemake (--sdm conda) once the env exists: install this workflow's own package into it,
# editable (jobs run the checkout's code) and without dependencies (they are pinned in the .yaml).
set -euo pipefail
python -m pip install --no-deps --editable "${M2OTCA_PIPELINE_SRC:?set by workflow/rules/common.smk to the repository root}"
