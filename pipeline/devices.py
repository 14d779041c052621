"""The one rule that turns a `device` option (CLI `--device`, config `training.device`) into a
torch device, shared by extraction, training and prediction."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA device when torch sees one, else the CPU. Any other name ("cpu",
    "cuda", "cuda:1", "mps") must be a torch device this machine has: a ConfigError (one line,
    exit 2) otherwise, before any work starts, rather than a failure at the first batch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a torch device name (auto, cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            have = f"{n} CUDA device(s)" if n else "no usable CUDA device"
            raise ConfigError(f"device {name!r} asked for, but this machine has {have}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but this machine has no usable MPS device")
    return dev
