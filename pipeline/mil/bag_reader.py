"""Reading slides' features in a child process, off the trainer's GIL.

Why: a GPU training step is a stream of ~660 kernel launches, each releasing and retaking the
GIL, and a bag loader in a thread of the same process takes the GIL in between for its Python
(metadata, chunk files, codecs: ~2.5 ms per slide held, ~200 handoffs). On a CPU proxy of such
a step (``bench/train_step.py --epoch-step-tiles``) loading in a thread at 60 slides/s slowed the
step 1.2x; receiving the same bags already read (unpickling) slowed it by nothing measurable.

The child is a plain ``python -m pipeline.mil.bag_reader`` (no fork: a forked child of a large
process makes every page the parent writes afterwards a copy-on-write fault, measured at ~1 s of
system time per epoch). It imports no torch, so it is ready in ~0.3 s. Protocol, all pickles:
the child writes ``READY`` once, then reads lists of (slide, stores) from stdin and answers each
slide with (slide, (features, coords, regions)) or (slide, the exception); EOF on stdin ends it,
so it never outlives the trainer.
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.store import read_feature_store

READY = b"R"


def read_slide(stores: dict[str, Path]) -> tuple[dict, dict, dict]:
    """(features, coords, region ids) per magnification of one slide from its feature stores;
    failed tiles dropped. Damaged stores raise SlideError naming them."""
    feats: dict[str, np.ndarray] = {}
    coords: dict[str, np.ndarray] = {}
    regions: dict[str, np.ndarray] = {}
    by_store: dict[Path, list[str]] = {}
    for mag, p in stores.items():
        by_store.setdefault(Path(p), []).append(mag)
    for p, mags in by_store.items():
        _, sets = read_feature_store(p, mags)
        for mag in mags:
            s = sets[mag]
            if s.failed.any():
                keep = ~s.failed
                s.features, s.coords, s.region = s.features[keep], s.coords[keep], s.region[keep]
            feats[mag], coords[mag], regions[mag] = s.features, s.coords, s.region
    return feats, coords, regions


class BagReader:
    """The parent's end of one reader process: ask for slides, receive them in the order asked."""

    def __init__(self):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this package's source, also when not installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.mil.bag_reader"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, bufsize=1 << 20)
        _widen_pipe(self.proc.stdout.fileno())
        self._ready = False

    def ready(self) -> bool:
        """Whether the child has started (never blocks): until then the caller reads bags itself.
        EOFError if it ended instead (its error is on stderr)."""
        if not self._ready and select.select([self.proc.stdout], [], [], 0)[0]:
            if self.proc.stdout.read(1) != READY:
                raise EOFError("the bag reader process ended before it started")
            self._ready = True
        return self._ready

    def request(self, jobs: list[tuple[str, dict[str, Path]]]) -> None:
        """Ask for `jobs` (slide, stores), answered in this order after any asked before."""
        pickle.dump(jobs, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def receive(self) -> tuple[str, tuple | BaseException]:
        """The next answer; EOFError when the child is gone (killed, out of memory)."""
        try:
            return pickle.load(self.proc.stdout)
        except pickle.UnpicklingError as e:  # cut off mid-answer
            raise EOFError(str(e)) from e

    def close(self) -> None:
        """Ends the child: it holds nothing worth finishing (answers not taken are dropped)."""
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:  # a broken pipe to a child already gone
                pass


def _widen_pipe(fd: int) -> None:
    """Linux: a 1 MiB pipe (F_SETPIPE_SZ), so a slide's ~2 MB arrive in a few reads, not ~35."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
    except (ImportError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: the default pipe
        pass


def _serve(inp, out) -> None:
    """The child's loop: answer every (slide, stores) asked on `inp` until EOF."""
    from numcodecs import blosc

    blosc.use_threads = False  # one core: the trainer has the others
    _widen_pipe(out.fileno())
    out.write(READY)
    out.flush()
    while True:
        try:
            jobs = pickle.load(inp)
        except EOFError:
            return
        for sid, stores in jobs:
            try:
                answer = (sid, read_slide(stores))
            except Exception as e:  # noqa: BLE001 -- handed to the parent, which raises it for this slide
                answer = (sid, e)
            try:
                payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
            except (pickle.PicklingError, TypeError, AttributeError) as e:  # an exception that cannot cross
                payload = pickle.dumps((sid, RuntimeError(f"{sid}: {type(answer[1]).__name__}: {answer[1]} ({e})")))
            out.write(payload)
            out.flush()


if __name__ == "__main__":
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print goes to stderr, never into the answers
    _serve(sys.stdin.buffer, answers)
