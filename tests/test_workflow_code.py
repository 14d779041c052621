"""The workflow as code: quoting of shell arguments, what the Snakemake process imports, and the
conda envs of its rules (static: every module a rule runs is installable from its env)."""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
import yaml
from conftest import REPO, shared_slide, snakemake_cmd, venv_env, write_cohort
from packaging.requirements import Requirement

from pipeline.cli import build_parser
from pipeline.provenance import command_files, parse

pytestmark = pytest.mark.integration


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def shell_commands(out: str) -> list[list[str]]:
    """`python -m pipeline` argument lists of the `Shell command:` lines of `snakemake -n -p`,
    split as bash splits them, from the command name to the log redirection."""
    cmds = []
    for line in out.splitlines():
        if "Shell command:" in line and "python -m pipeline" in line:
            argv = shlex.split(line.split("Shell command:", 1)[1])
            cmds.append(argv[argv.index("pipeline") + 1 : argv.index(">")])
    return cmds


def arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_config_strings_with_quotes_reach_commands_intact(tmp_path):
    """A sheet path and a slide id list with `'` and spaces arrive as the exact JSON/strings."""
    cohort = tmp_path / "o'brien lab"
    cohort.mkdir()
    slide = shared_slide("CMU-1-Small-Region.svs")
    write_cohort(cohort, [("cmu", slide, "tumor"), ("cmu2", slide, "normal"), ("cmu3", slide, "tumor"),
                          ("cmu4", slide, "normal")],  # two patients per class for two folds
                 "splits: {folds: 2}\nmodels: [abmil_3]\nheatmaps: {model: abmil_3, slides: [cmu]}\n")
    r = subprocess.run(snakemake_cmd(cohort, "-n", "-p"), capture_output=True, text=True, cwd=cohort, env=venv_env())
    assert r.returncode == 0, r.stderr[-3000:]
    parser = build_parser()
    cmds = {}
    for argv in shell_commands(r.stdout + r.stderr):
        parser.parse_args(argv)  # every argument arrives as the CLI expects it (SystemExit otherwise)
        cmds[argv[0]] = argv
    assert {"tile", "extract", "splits", "train", "evaluate", "manifest", "heatmaps"} <= set(cmds), sorted(cmds)
    assert arg(cmds["heatmaps"], "--slides") == "cmu"
    config = json.loads(arg(cmds["manifest"], "--config-json"))
    assert config["slides"] == str(cohort / "slides.tsv") and "'" in config["slides"]
    assert arg(cmds["splits"], "--sheet") == str(cohort / "slides.tsv")
    assert json.loads(arg(cmds["tile"], "--tiling"))["tissue_threshold"] == 0.35
    assert json.loads(arg(cmds["train"], "--training"))["epochs"] == config["training"]["epochs"]


def test_snakemake_process_never_imports_torch(tmp_path):
    """Parsing the workflow and planning every job (weights hashed included) leaves torch unloaded."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not really weights")
    slide = shared_slide("CMU-1-Small-Region.svs")
    write_cohort(tmp_path, [(f"cmu{i}", slide, ("tumor", "normal")[i % 2]) for i in range(4)],
                 f"splits: {{folds: 2}}\nfeatures: {{weights: {{resnet18_simclr: {weights}}}}}\n")
    argv = snakemake_cmd(tmp_path, "-n", "-p")[3:]  # drop `python -m snakemake`
    code = ("import sys\nfrom snakemake.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('RC', rc, 'TORCH' if 'torch' in sys.modules else 'NO-TORCH', "
            "sorted(m for m in sys.modules if m in ('timm', 'torchvision', 'pipeline.features.encoders')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=venv_env())
    out = r.stdout + r.stderr
    assert "RC 0 NO-TORCH []" in out, out[-3000:]
    assert "--weights" in out and str(weights) in out  # the job that hashes the weights was planned


def rule_blocks() -> list[dict[str, str]]:
    """Every rule of the workflow's .smk files: its name, conda env path and pipeline command."""
    rules = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text()
        for m in re.finditer(r"^\s*(?:rule|checkpoint) (\w+):\n(.*?)(?=^\s*(?:rule|checkpoint) \w+:|\Z)", text, re.S | re.M):
            body = m.group(2)
            env = re.search(r'conda:\s*\n\s*"([^"]+)"', body)
            cmd = re.search(r"python -m pipeline ([\w-]+)", body)
            rules.append({"rule": m.group(1), "file": smk, "env": env and (smk.parent / env.group(1)).resolve(),
                          "command": cmd and cmd.group(1), "code": "code_fingerprint(" in body})
    return rules


def test_lesion_evaluation_runs_when_lesions_are_named(tmp_path):
    """annotations.lesion_classes + a folder of annotations: evaluate-lesions gets every fold's
    attention of every model and the features of every magnification; without classes: no job."""
    slide = shared_slide("CMU-1-Small-Region.svs")
    rows = [("cmu", slide, "tumor"), ("cmu2", slide, "normal"), ("cmu3", slide, "tumor"), ("cmu4", slide, "normal")]
    base = "splits: {folds: 2}\nmodels: [abmil_3, m2otca]\nheatmaps: {n_auto: 0}\n"
    cmds = {}
    for name, extra in (("on", "annotations: {lesion_classes: [Tumor, 'O''Brien'], non_lesion_classes: [_2], "
                                "dir: ann dir}\n"),
                        ("off", "annotations: {lesion_classes: []}\n")):
        cohort = tmp_path / name
        (cohort / "ann dir").mkdir(parents=True)
        for f in ("cmu.geojson", "cmu3.xml", "notes.txt"):
            (cohort / "ann dir" / f).write_text("{}")
        write_cohort(cohort, rows, base + extra)
        r = subprocess.run(snakemake_cmd(cohort, "-n", "-p"), capture_output=True, text=True, cwd=cohort, env=venv_env())
        assert r.returncode == 0, r.stderr[-3000:]
        cmds[name] = [a for a in shell_commands(r.stdout + r.stderr) if a[0] == "evaluate-lesions"]
        if name == "on":  # the annotation files are inputs: a changed one reruns the evaluation
            job = (r.stdout + r.stderr).split("rule evaluate_lesions:", 1)[1]
            inputs = job.split("input:", 1)[1].splitlines()[0].strip().split(", ")
            assert [f for f in inputs if f.startswith("ann dir/")] == ["ann dir/cmu.geojson", "ann dir/cmu3.xml"]
    assert cmds["off"] == [] and len(cmds["on"]) == 1
    argv = cmds["on"][0]
    build_parser().parse_args(argv)
    assert arg(argv, "--annotations-dir") == "ann dir" and arg(argv, "--lesion-classes") == "Tumor,O'Brien"
    assert arg(argv, "--non-lesion-classes") == "_2"
    assert arg(argv, "--normal-label") == "normal" and arg(argv, "--out-dir") == "results/tiny/lesions/resnet18_simclr"
    attention = [argv[i + 1] for i, a in enumerate(argv) if a == "--attention"]
    assert sorted(attention) == sorted(f"{m}=results/tiny/models/resnet18_simclr/{m}/fold_{k}/attention.npz"
                                       for m in ("abmil_3", "m2otca") for k in (0, 1))
    assert [argv[i + 1].split("=")[0] for i, a in enumerate(argv) if a == "--features"] == ["20x", "10x", "5x"]
    shutil.rmtree(tmp_path / "on" / "ann dir")  # a folder that is not there: one clear error before any job
    r = subprocess.run(snakemake_cmd(tmp_path / "on", "-n"), capture_output=True, text=True, cwd=tmp_path / "on",
                       env=venv_env())
    assert r.returncode != 0 and "annotations.dir ann dir: no such folder" in r.stdout + r.stderr


def env_pins(env: Path) -> dict[str, str]:
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {norm(p.split("==")[0]): p.split("==")[1] for p in pip if "==" in p}


def third_party_imports(files: list[Path]) -> set[str]:
    mods = set()
    for f in files:
        for n in ast.walk(parse(f)):
            if isinstance(n, ast.Import):
                mods |= {a.name.split(".")[0] for a in n.names}
            elif isinstance(n, ast.ImportFrom) and not n.level and n.module:
                mods.add(n.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "pipeline"}


def test_every_rule_has_an_env_a_command_and_a_code_fingerprint():
    rules = rule_blocks()
    assert len(rules) >= 12, [r["rule"] for r in rules]
    for r in rules:
        assert r["env"] is not None and r["env"].is_file(), r
        assert r["command"] and r["code"], f"{r['rule']}: no `python -m pipeline` command or no code param"


def test_rule_envs_hold_every_package_their_code_imports():
    """Static check of `--sdm conda` (no conda here): a rule's modules import only what its env pins."""
    dist_of = packages_distributions()
    for r in rule_blocks():
        pins = env_pins(r["env"])
        need = {norm(dist_of[m][0]) for m in third_party_imports(command_files(r["command"]))}
        missing = need - set(pins)
        assert not missing, f"rule {r['rule']} ({r['command']}): {r['env'].name} lacks {sorted(missing)}"


def test_env_pins_are_inside_pyproject_ranges():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {norm(Requirement(d).name): Requirement(d) for d in project["dependencies"]}
    for env in sorted((REPO / "envs").glob("*.yaml")):
        spec = yaml.safe_load(env.read_text())
        py = next(d for d in spec["dependencies"] if isinstance(d, str) and d.startswith("python="))
        assert project["requires-python"].startswith(">=3.") and py.split("=")[1] >= project["requires-python"][2:]
        for name, version in env_pins(env).items():
            if name in declared:
                assert declared[name].specifier.contains(version), f"{env.name}: {name}=={version} vs {declared[name]}"
            else:  # pinned for its own sake: must at least come with a declared dependency
                deps = {norm(Requirement(q).name) for d in declared for q in (requires(d) or [])}
                assert name in deps, f"{env.name}: {name} is neither in pyproject.toml nor required by what is"


def test_envs_install_the_package_itself():
    """Snakemake copies env files to .snakemake/conda/ (a relative `-e ../` would point there):
    each env's post-deploy script installs the repository that common.smk names."""
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert 'os.environ.setdefault("M2OTCA_PIPELINE_SRC", workflow.basedir)' in common
    for env in sorted((REPO / "envs").glob("*.yaml")):
        script = env.with_suffix(".post-deploy.sh")
        assert script.is_file(), f"{env.name}: no {script.name}"
        text = script.read_text()
        assert "pip install --no-deps --editable" in text and "M2OTCA_PIPELINE_SRC" in text
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
