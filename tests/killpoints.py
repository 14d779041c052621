"""Injected kill points: run `python -m pipeline <args>` with one function wrapped so that its
n-th matching call SIGKILLs the process (test hook; nothing in `pipeline/` knows about it).

The spec is "module:attr[substring]:n:mode": calls whose arguments' text contains the
substring (all calls when there is none) are counted and the n-th one kills the process
"before" it runs, "after" it returns, or after "truncate" (it runs, then the file it wrote,
its first path argument, is cut to half its size). E.g. "pipeline.store:FeatureStoreWriter.write:2:after"
kills extraction right after its 2nd committed chunk.
"""

from __future__ import annotations

import signal
import subprocess
import sys

DRIVER = r"""
import importlib, os, re, signal, sys
from pathlib import Path
spec, argv = sys.argv[1], sys.argv[2:]
target, match, n, mode = re.fullmatch(r"([\w.]+:[\w.]+)(?:\[(.*)\])?:(\d+):(before|after|truncate)", spec).groups()
mod_name, attr = target.split(":")
owner = importlib.import_module(mod_name)
*path, name = attr.split(".")
for p in path:
    owner = getattr(owner, p)
real = getattr(owner, name)
calls = [0]
def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
def wrapper(*a, **k):
    if match and not any(match in str(v) for v in a):
        return real(*a, **k)
    calls[0] += 1
    hit = calls[0] == int(n)
    if hit and mode == "before":
        die()
    out = real(*a, **k)
    if hit and mode == "truncate":
        f = Path(next(v for v in a if isinstance(v, (str, os.PathLike))))
        os.truncate(f, f.stat().st_size // 2)
    if hit:
        die()
    return out
setattr(owner, name, wrapper)
from pipeline.cli import main
sys.exit(main(argv))
"""


def run_killed(spec: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline <args>` killed at `spec`; fails the test when the kill point is never reached."""
    r = subprocess.run([sys.executable, "-c", DRIVER, spec, *args], capture_output=True, text=True, env=env)
    assert r.returncode == -signal.SIGKILL, f"{spec}: the kill point was never reached (exit {r.returncode}):\n{r.stderr[-2000:]}"
    return r
