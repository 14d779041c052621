"""Every default and rule the config schema shares with the code is the same in both places:
CLI option defaults, the config dataclasses' defaults, the id rule, the model names."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from conftest import REPO

from pipeline.cli import COMMANDS, build_parser

SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())

# (command, option dest) -> config key (dotted) the workflow passes to that option
CLI_KEYS = {
    ("splits", "folds"): "splits.folds",
    ("splits", "val_fraction"): "splits.val_fraction",
    ("splits", "seed"): "splits.seed",
    ("extract", "batch_size"): "features.batch_size",
    ("extract", "on_tile_error"): "features.on_tile_error",
    ("extract", "compile"): "features.compile",
    ("heatmaps", "n"): "heatmaps.n_auto",
    ("summarize-metrics", "reference"): "reference_model",
    ("demo-cohort", "n"): "demo.n_slides",
    ("demo-cohort", "seed"): "demo.seed",
    ("demo-cohort", "scale"): "demo.scale",
    ("cohort-qc", "min_tiles"): "qc.min_tiles",
    ("cohort-qc", "outlier_z"): "qc.outlier_z",
    ("predict", "bootstrap"): "predict.bootstrap",
    ("predict", "seed"): "predict.seed",
    ("predict", "heatmap_n"): "predict.heatmaps.n_auto",
}
# config.yaml choices that differ from the defaults on purpose (the demo runs smaller slides)
CONFIG_CHOICES = {"demo.scale"}


def schema_default(key: str) -> Any:
    node = SCHEMA
    for part in key.split("."):
        node = node["properties"][part]
    return node["default"]


def config_value(key: str) -> Any:
    node = CONFIG
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def subparser(command: str):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command, dest", list(CLI_KEYS))
def test_cli_defaults_are_the_config_defaults(command, dest):
    key = CLI_KEYS[(command, dest)]
    cli = subparser(command).get_default(dest)
    assert cli == schema_default(key), f"{command} --{dest.replace('_', '-')} defaults to {cli!r}, {key} to {schema_default(key)!r}"
    if key not in CONFIG_CHOICES and config_value(key) is not None:
        assert cli == config_value(key), f"config.yaml sets {key}: {config_value(key)!r}, the CLI's default is {cli!r}"


def test_config_dataclass_defaults_are_the_schema_defaults():
    from pipeline.config import TilingConfig
    from pipeline.features.extract import ExtractConfig
    from pipeline.mil.train import TrainConfig

    for cls, section in ((TilingConfig, "tiling"), (TrainConfig, "training"), (ExtractConfig, "features")):
        props = SCHEMA["properties"][section]["properties"]
        for f in dataclasses.fields(cls):
            if f.name not in props or f.name == "model":  # model: tests/test_models.py compares ModelConfig
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert default == props[f.name]["default"], f"{cls.__name__}.{f.name} = {default!r}, schema {section}.{f.name}"


def test_ids_follow_one_rule():
    """The cohort name and slide ids are folder names: one rule (pipeline.slides.sheet.SAFE_ID), which
    the workflow's wildcard constraint also uses."""
    from pipeline.slides.sheet import SAFE_ID

    assert SCHEMA["properties"]["cohort"]["pattern"] == SAFE_ID.pattern
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert "SAFE_ID.pattern" in common


def test_model_names_in_the_config_are_registered():
    """(The schema's `models` enum is compared with MODEL_NAMES in tests/test_models.py.)"""
    from pipeline.mil.models import MODEL_NAMES

    for key in ("reference_model", "heatmaps.model"):
        assert schema_default(key) in MODEL_NAMES, key
        assert config_value(key) in MODEL_NAMES, key
    assert set(CONFIG["models"]) <= set(MODEL_NAMES)


def test_every_help_page_renders(capsys):
    """`--help` of the CLI and of each command prints (argparse formats help text with %)."""
    parser = build_parser()
    for argv in [[], *([c] for c in COMMANDS)]:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*argv, "--help"])
        assert e.value.code == 0, argv
    out = capsys.readouterr().out
    assert "95 % CIs" in out and all(c in out for c in COMMANDS)
