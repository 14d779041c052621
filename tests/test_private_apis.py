"""The library behaviour the pipeline's low-level choices rely on, pinned: a torch or glibc
upgrade that changes it fails here, not in a user's run (see bench/private_apis.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from pipeline.mil.train import FUSED_ADAM_DEVICES, TrainConfig, make_optimizer


def test_default_collate_stacks_into_shared_memory_in_a_worker():
    """extract.make_loader relies on it: a worker's batch is built in shared memory, so it crosses
    to the main process without another copy (torch does it with a private call; we don't)."""
    items = [(torch.full((4, 4, 3), i, dtype=torch.uint8), "" if i else "bad") for i in range(6)]

    def collate(batch):
        imgs, errs = default_collate(batch)
        return imgs, errs, imgs.is_shared()

    loader = DataLoader(items, batch_size=3, num_workers=1, collate_fn=collate, multiprocessing_context="fork")
    (imgs, errs, shared), _ = list(loader)
    assert shared and imgs.shape == (3, 4, 4, 3) and imgs.dtype == torch.uint8
    assert list(errs) == ["bad", "", ""] and imgs[:, 0, 0, 0].tolist() == [0, 1, 2]
    imgs, errs = default_collate(items[:2])  # in the main process: a plain stack
    assert not imgs.is_shared() and list(errs) == ["bad", ""]


def _adam_steps(device: str, fused: bool | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4, fused=fused)
    x = torch.randn(32, 8, device=device)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("device", FUSED_ADAM_DEVICES)
def test_fused_adam_exists_where_make_optimizer_asks_for_it(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = torch.nn.Linear(4, 2).to(device)
    assert make_optimizer(model, TrainConfig()).defaults["fused"] is True
    for a, b in zip(_adam_steps(device, True), _adam_steps(device, None)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the same Adam, to rounding


def test_no_fused_adam_elsewhere():
    model = torch.nn.Linear(4, 2).to("meta")
    assert not make_optimizer(model, TrainConfig()).defaults["fused"]


GLIBC_PROBE = r"""
import json, resource
import torch
from pipeline.features.extract import _glibc, keep_freed_memory, trim_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

def realloc_faults():  # page faults of a 64 MiB block allocated and written after equal ones were freed
    for _ in range(2):  # a steady state, as batches are: the first free may not border the heap's top
        a = torch.ones(64 << 20, dtype=torch.uint8)
        del a
    f = faults()
    a = torch.ones(64 << 20, dtype=torch.uint8)
    f = faults() - f
    del a
    return f

out = {"glibc": _glibc() is not None}
if out["glibc"]:
    out["default"] = realloc_faults()
    out["kept"] = keep_freed_memory() and realloc_faults()
    before = rss()
    trim_heap()
    out["trimmed_mib"] = (before - rss()) / 2**20
print(json.dumps(out))
"""


def test_glibc_heap_settings_do_what_extract_relies_on():
    """keep_freed_memory: a freed big block is reused without page faults (glibc's default
    unmaps it, so each batch faults its activations back in); trim_heap: the kept pages go back
    to the kernel (before a DataLoader worker forks)."""
    runs = []
    for _ in range(3):  # glibc falls back to mmap when the heap cannot grow in place (address layout)
        r = subprocess.run([sys.executable, "-c", GLIBC_PROBE], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.strip().splitlines()[-1])
        if not out["glibc"]:
            pytest.skip("not glibc: both calls are no-ops")
        assert out["default"] > 0 and out["kept"] is not False and out["kept"] <= out["default"]
        runs.append(out)
        if out["kept"] * 10 < out["default"] and out["trimmed_mib"] > 48:
            return
    pytest.fail(f"the freed block was never kept and trimmed in 3 runs: {runs}")
