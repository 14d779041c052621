"""The benchmark scripts' interfaces other tools rely on (tiny sizes: what is printed, not the figures)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def _restore_threads():
    """`--threads` sets torch's global thread count: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_step_last_line(tmp_path, capsys):
    mod = _load("train_step")
    mod.main(["--dim", "16", "--reps", "1", "--warmup", "0", "--epoch-slides", "8", "--epoch-repeats", "1",
              "--cohort-dir", str(tmp_path), "--threads", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"step_ms=([\d.]+) attention_ms=([\d.]+) ratio=([\d.]+) epoch_ratio=([\d.]+)", last)
    assert m, last
    step, att, ratio, epoch = map(float, m.groups())
    assert step > 0 and att > 0 and ratio == pytest.approx(step / att, abs=2e-3)
    assert math.isfinite(epoch) and epoch > 0.5


def test_train_step_epoch_skipped_is_nan(capsys):
    _load("train_step").main(["--dim", "16", "--reps", "1", "--warmup", "0", "--epoch-slides", "0", "--threads", "1"])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("epoch_ratio=nan")
