"""Atomic file writes: all or nothing, and what killed writers left behind is cleaned up."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from pipeline.atomic import atomic_path, write_text


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_failed_block_keeps_the_old_file(tmp_path):
    final = tmp_path / "metrics.json"
    write_text(final, "old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert final.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_leftovers_of_dead_writers_removed_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".metrics.tmp-{host}-{_dead_pid()}.json"
    live = tmp_path / f".metrics.tmp-{host}-{os.getppid()}.json"  # our parent: alive
    other_host = tmp_path / ".metrics.tmp-elsewhere-1.json"  # cannot tell: left alone
    other_file = tmp_path / f".history.tmp-{host}-{_dead_pid()}.tsv"  # another file's: not ours to remove
    for p in (dead, live, other_host, other_file):
        p.write_text("partial")
    write_text(tmp_path / "metrics.json", "new")
    assert (tmp_path / "metrics.json").read_text() == "new"
    assert not dead.exists()
    assert live.exists() and other_host.exists() and other_file.exists()
