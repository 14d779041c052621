"""Write files under a temporary name and rename them when complete: a reader (or a rerun after
kill -9) never sees a half-written PNG, table or checkpoint.

Temporary names carry the writer's host and pid (`.<stem>.tmp-<host>-<pid><suffix>`), so a
later successful write of the same file removes what killed writers on this host left behind.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path


def writer_tag() -> str:
    """Host and pid of this process, in the names of its temporary files and directories."""
    return f"{socket.gethostname()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def local_pid(tag: str) -> int | None:
    """The pid in a writer tag (see :func:`writer_tag`) from this host; None for another host."""
    host, _, pid = tag.rpartition("-")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def writer_alive(tag: str) -> bool:
    """Whether the writer of `tag` may still be running (another host's or an unknown one: yes)."""
    pid = local_pid(tag)
    return pid is None or pid_alive(pid)


def dead_writer_leftovers(parent: Path, prefix: str, suffix: str = "") -> Iterator[Path]:
    """Entries `<prefix><writer tag><suffix>` of `parent` whose writer on this host is gone."""
    for p in parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        if not writer_alive(p.name[len(prefix) : len(p.name) - len(suffix)]):
            yield p


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `final` only if the block succeeds.

    The data reaches the disk (fsync) before the rename, so after a crash of the machine the
    final name holds either the old file or the complete new one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.stem}.tmp-"
    tmp = final.with_name(f"{prefix}{writer_tag()}{final.suffix}")  # keeps the suffix for writers that need it
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    for old in dead_writer_leftovers(final.parent, prefix, final.suffix):  # killed writers of this file
        if old.is_file():
            old.unlink(missing_ok=True)


def write_text(final: str | Path, text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def write_tsv(final: str | Path, table) -> None:
    """A pandas DataFrame as a tab-separated file without the index, atomically."""
    with atomic_path(final) as tmp:
        table.to_csv(tmp, sep="\t", index=False)


def json_safe(obj):
    """`obj` with every NaN/inf float as None, so the JSON written is valid (json.dumps would
    write the non-standard `NaN`); nested dicts, lists and numpy scalars are handled."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(final: str | Path, obj, indent: int | None = 2) -> None:
    """`obj` as strict JSON (NaN -> null), atomically."""
    import json

    write_text(final, json.dumps(json_safe(obj), indent=indent))
