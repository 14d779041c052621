"""How a store directory comes to be: built under a temporary name, renamed when whole, one
writer at a time (a lock file), and what interrupted writers leave behind.

Leftovers: `<name>.partial` (a resumable feature store), `.<name>.tmp-<host>-<pid>` (a store
being built) and `.<name>.old-<host>-<pid>` (the previous store, moved aside while replaced).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import zarr

from pipeline import __version__
from pipeline.atomic import dead_writer_leftovers, local_pid, pid_alive, writer_tag
from pipeline.store.contract import LAYOUT_VERSION, json_safe


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished store into place, replacing an older one.

    Between the two renames the final path is briefly absent (a reader sees "missing", never a
    mixed store). Afterwards, temporary directories left by killed writers of this store on this
    host are removed, so an interrupted run leaves no garbage once a rerun completes.
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{writer_tag()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _remove_dead_leftovers(final)


def tmp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{writer_tag()}")


def write_failed_store(path: str | Path, kind: str, slide_id: str, error: str, attrs: dict[str, Any] | None = None) -> None:
    """A store that records why `slide_id` failed, so the cohort goes on and the report lists it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    meta = {"layout_version": LAYOUT_VERSION, "kind": kind, "status": "failed", "slide_id": slide_id,
            "error": error, "package_version": __version__, **(attrs or {})}
    root.attrs.update(json_safe(meta))
    replace_dir(tmp, final)


class StoreBusy(RuntimeError):
    """Another process is writing this store."""


_HELD_LOCKS: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the lock files this process holds


class WriterLock:
    """The lock file `.<store>.lock` beside a store being written, held with a POSIX write lock
    (fcntl F_SETLK); StoreBusy when another writer holds it.

    POSIX record locks belong to the process, not to the open file: forked children (DataLoader
    workers) do not inherit them, so a writer killed with -9 frees the store at once instead of
    when its orphaned workers notice and exit. They do not exclude the own process, hence the
    in-process registry; and closing any descriptor of the file drops them, hence the check
    before opening it a second time.
    """

    def __init__(self, store: str | Path):
        store = Path(store)
        self.path = store.with_name(f".{store.name}.lock")
        while True:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) in _HELD_LOCKS:
                    raise StoreBusy(f"another writer in this process is writing {store}")
            fh = open(self.path, "a")
            try:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                fh.close()
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise StoreBusy(f"another process is writing {store}") from None
                raise
            st = os.fstat(fh.fileno())
            try:  # the previous holder unlinks the file when done: make sure ours is still the one there
                if os.stat(self.path).st_ino == st.st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        self._fh, self._key = fh, (st.st_dev, st.st_ino)
        _HELD_LOCKS.add(self._key)

    @property
    def held(self) -> bool:
        return not self._fh.closed

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._fh.close()
            _HELD_LOCKS.discard(self._key)


_LEFTOVER_MARKERS = (".tmp-", ".old-")


def _split_leftover(name: str) -> tuple[str, str] | None:
    """(store name, writer tag) of `.<name>.tmp-<tag>` / `.<name>.old-<tag>`, else None."""
    if name.startswith("."):
        for marker in _LEFTOVER_MARKERS:
            base, sep, tag = name[1:].rpartition(marker)
            if sep and base and tag:
                return base, tag
    return None


def leftover_target(path: str | Path) -> Path | None:
    """The store a leftover directory of an interrupted writer belongs to; None if `path` is not one.

    Leftovers: `<name>.partial` (resumable feature store), `.<name>.tmp-<host>-<pid>` (store being
    built) and `.<name>.old-<host>-<pid>` (the previous store, moved aside while being replaced).
    """
    p = Path(path)
    if p.name.endswith(".partial"):
        return p.with_name(p.name.removesuffix(".partial"))
    parts = _split_leftover(p.name)
    return p.with_name(parts[0]) if parts else None


def leftover_writer(path: str | Path) -> int | None:
    """pid of the live process on this host still writing a leftover directory, else None."""
    p = Path(path)
    final = leftover_target(p)
    if final is None:
        return None
    if p.name.endswith(".partial"):  # resumable feature store: its writer holds the lock file
        return _lock_holder(final.with_name(f".{final.name}.lock"))
    pid = local_pid(_split_leftover(p.name)[1])
    return pid if pid is not None and pid_alive(pid) else None


def _lock_holder(lock: Path) -> int | None:
    """pid holding a lock on `lock`, read from /proc/locks (never takes the lock itself).

    /proc/locks is the kernel's documented interface (proc(5)). The alternative, fcntl F_GETLK,
    needs a descriptor of the lock file, and closing it would drop every POSIX lock this process
    holds on that file; its `struct flock` layout is also platform-specific. Elsewhere: None.
    """
    try:
        st = os.stat(lock)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] in ("POSIX", "FLOCK") and f[5] == want and f[4].isdigit():
            return int(f[4])
    return None


def _remove_dead_leftovers(final: Path) -> None:
    """Remove `.tmp-`/`.old-` directories of `final` whose writer process is gone."""
    for marker in _LEFTOVER_MARKERS:
        for p in dead_writer_leftovers(final.parent, f".{final.name}{marker}"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
