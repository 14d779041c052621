"""The workflow through a REAL single-node SLURM with workflow/profiles/slurm.

The test starts munged, slurmctld and slurmd from Debian's slurm-wlm/munge packages (see
tests/slurm_cluster.py), runs the tiny cohort (a real slide and an unreadable one) to tile
summary and features with `--profile workflow/profiles/slurm`, and checks that every rule ran
as a SLURM job: the job ids Snakemake reports are the ones slurmctld logged as `_job_complete`
with exit status 0 (no slurmdbd here, so its log is the accounting). Skipped locally when Slurm
is missing and cannot be installed (root + apt-get); in CI (CI=true) it must run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time

import pandas as pd
import pytest
import slurm_cluster
from conftest import REPO, shared_slide, snakemake_cmd, venv_env, write_cohort

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROFILE = REPO / "workflow" / "profiles" / "slurm"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


def unavailable(msg: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"SLURM test cannot run in CI: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        unavailable("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    if os.geteuid() != 0:
        unavailable("needs root to run slurmctld/slurmd")
    if slurm_cluster.missing():
        log = slurm_cluster.try_install()
        if miss := slurm_cluster.missing():
            unavailable(f"Slurm not installed ({', '.join(miss)}) and installing failed:\n{log}")
    c = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    t0 = time.monotonic()
    try:
        c.start()
    except slurm_cluster.SlurmUnavailable as e:
        unavailable(str(e))
    print(f"single-node SLURM up in {time.monotonic() - t0:.1f} s: {c.hardware} (state/logs {c.root})")
    yield c
    c.stop()


def test_workflow_runs_through_slurm(cluster, tmp_path, capsys):
    rows = [("cmu", shared_slide("CMU-1-Small-Region.svs"), "tumor"),
            ("unreadable", shared_slide("broken/unreadable.svs"), "normal")]
    write_cohort(tmp_path, rows)

    # The node has no GPU: override the rules' gpu requests (on a real cluster the profile's
    # set-resources maps them). A command-line --set-resources replaces the profile's block.
    set_resources = ["extract_features:gpu=0", "train_mil:gpu=0"]
    mem = cluster.hardware["RealMemory"]
    if mem < 9000:  # a small CI machine: keep every request satisfiable by the one node
        set_resources += [f"{r}:mem_mb={mem // 3}" for r in ("tile_slide", "summarize_tiles", "extract_features")]
    cmd = snakemake_cmd(tmp_path, "--profile", str(PROFILE), "--workflow-profile", "none",
                        "--jobs", "4", "--latency-wait", "5",
                        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
                        "--slurm-keep-successful-logs", "--set-resources", *set_resources, "--", "tiles_summary", "features",
                        cores=None)  # no --cores: the profile's executor runs with --jobs, as before
    env = venv_env(slurm_cluster.clean_env())
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=420)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"snakemake on SLURM timed out\n{(e.stderr or b'')[-3000:]!r}\n{cluster.diagnostics()}")
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:] + "\n" + cluster.diagnostics()
    assert "Falling back to 'sacct'" not in out  # the profile's squeue status held (MinJobAge=300)

    # every job went to SLURM and SLURM accounted it as completed with exit status 0
    submitted = {int(j): int(s) for j, s in SUBMITTED.findall(out)}  # snakemake job -> SLURM job id
    assert len(submitted) >= 5, out[-3000:]  # 2x tile_slide, summarize_tiles, 2x extract_features
    completed = cluster.completed_jobs()
    ids = sorted(submitted.values())
    assert set(ids) <= set(completed), f"submitted {ids}, slurmctld completed {sorted(completed)}"
    assert all(completed[i] == 0 for i in ids), completed
    rules, asked = {}, {}
    for i in ids:
        info = cluster.job_state(i)  # finished jobs stay in slurmctld for MinJobAge (300 s)
        assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
        rules[i] = re.search(r"Comment=rule_(\w+?)(?:_wildcards_\S*)?\s", info).group(1)
        # the rule's resources reached sbatch: runtime -> -t, mem_mb -> --mem, threads -> -c
        f = dict(re.findall(r"\b(TimeLimit|MinMemoryNode|NumCPUs|Partition)=(\S+)", info))
        assert f.get("TimeLimit") not in (None, "UNLIMITED") and "MinMemoryNode" in f, info
        asked[i] = f
    assert {"tile_slide", "summarize_tiles", "extract_features"} <= set(rules.values()), rules
    logs = {int(p.stem) for p in (tmp_path / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(ids) <= logs, (ids, sorted(logs))

    # the outputs, with the broken slide recorded rather than fatal
    res = tmp_path / "results" / "tiny"
    summary = pd.read_csv(res / "tiles" / "summary.tsv", sep="\t").set_index("slide_id")
    assert summary.loc["cmu", "status"] == "ok" and summary.loc["cmu", "tiles_20x"] > 0
    assert summary.loc["unreadable", "status"] == "failed"
    assert (res / "features" / "resnet18_simclr" / "cmu.zarr").is_dir()
    assert (res / "qc" / "cmu.png").exists()

    ctld = cluster.ctld_log.read_text(errors="replace").splitlines()
    with capsys.disabled():  # shown in the CI log even when the test passes
        print(f"\nSLURM ran {len(ids)} jobs in {took:.0f} s (snakemake job -> SLURM job id: {submitted})")
        for i in ids:
            print(f"  SLURM job {i}: rule {rules[i]}, exit {completed[i]}, "
                  + " ".join(f"{k}={v}" for k, v in sorted(asked[i].items())))
        for line in ctld:
            if "_job_complete" in line:
                print("  slurmctld:", line)
