"""Reading slides' bags in a child process, off the trainer's GIL.

Why: a GPU training step is a stream of ~660 kernel launches, each releasing and retaking the
GIL, and a bag loader in a thread of the same process takes the GIL in between for its Python
(metadata, chunk files, codecs, groups: ~2.5 ms per slide held, ~200 hand-offs). On a CPU proxy of
such a step (``bench/train_step.py --epoch-step-tiles``) loading in a thread at 60 slides/s slowed
the step 1.2x.

The child is a plain Python process running :func:`main` (no fork: a forked child of a large
process makes every page the parent writes afterwards a copy-on-write fault, measured at ~1 s of
system time per epoch). It imports no torch, so it is ready in ~0.3 s. It builds each whole bag
(:func:`~pipeline.mil.bag_arrays.bag_arrays`) and writes its arrays into a memfd, a file in RAM
that it hands over through a Unix socket with a small pickled header. The parent copies the file
into one buffer with a single ``preadv`` (the GIL released) and views the arrays in it: ~0.15 ms
of its GIL per slide (py-spy), against ~2.5 ms to read the slide itself. A memfd is not /dev/shm, so a container's small /dev/shm does not limit it.

Protocol: requests are pickles on the child's stdin, lists of (slide, stores, n_groups,
magnification values); answers, in the order asked, are socket messages (slide, layout, size)
with the memfd attached, or (slide, the exception's parts, 0) with none (:func:`_send_error`).
EOF on stdin ends the child, so it never outlives the trainer.
"""

from __future__ import annotations

import math
import os
import pickle
import select
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import SlideError
from pipeline.mil.bag_arrays import KINDS, bag_arrays, read_slide

READY = b"R"
_ALIGN = 64  # each array starts on a cache line of the buffer


def reader_supported() -> bool:
    """Whether this platform has what the reader needs (Linux: memfd and fd passing)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and hasattr(os, "preadv")


class BagReader:
    """The parent's end of one reader process: ask for slides, receive them in the order asked."""

    def __init__(self):
        # `python -c`, this package's source first on the path: never another `pipeline` that the
        # working directory (which `python -m` would put first) or an install may hold
        root = str(Path(__file__).resolve().parents[2])
        code = f"import sys; sys.path.insert(0, {root!r}); from pipeline.mil.bag_reader import main; main()"
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())],
                                         stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        self._ready = False

    def ready(self) -> bool:
        """Whether the child has started (never blocks): until then the caller reads bags itself.
        EOFError if it ended instead (its error is on stderr)."""
        if not self._ready and select.select([self.sock], [], [], 0)[0]:
            if self.sock.recv(16) != READY:
                raise EOFError("the bag reader process ended before it started")
            self._ready = True
        return self._ready

    def request(self, jobs: list[tuple[str, dict[str, Path], int, dict[str, float]]]) -> None:
        """Ask for `jobs` (slide, stores, n_groups, magnification values), answered in this
        order after any asked before."""
        pickle.dump(jobs, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def receive(self) -> tuple[str, dict[str, dict[str, np.ndarray]] | BaseException]:
        """The next answer: the slide and its bag's arrays (kind -> magnification -> array, all
        views of one buffer), or the exception reading it raised. EOFError when the child is gone
        (killed, out of memory)."""
        try:
            msg, fds, flags, _ = socket.recv_fds(self.sock, 1 << 16, 1)
        except OSError as e:
            raise EOFError(str(e)) from e
        if not msg:
            raise EOFError("")
        try:
            if flags & socket.MSG_TRUNC:
                raise EOFError("an answer too long for the socket buffer")
            sid, layout, size = pickle.loads(msg)
            if not fds:
                return sid, _rebuild(layout)  # an error, not a layout
            buf = np.empty(size, np.uint8)
            done = 0
            while done < size:
                n = os.preadv(fds[0], [buf[done:]], done)
                if n <= 0:
                    raise EOFError(f"{sid}: the bag's memory file ended at {done} of {size} bytes")
                done += n
        finally:
            for fd in fds:
                os.close(fd)
        arrays: dict[str, dict[str, np.ndarray]] = {k: {} for k in KINDS}
        for kind, mag, dtype, shape, start in layout:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            arrays[kind][mag] = buf[start : start + nbytes].view(dtype).reshape(shape)
        return sid, arrays

    def close(self) -> None:
        """Ends the child: it holds nothing worth finishing (answers not taken are dropped)."""
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.sock):
            try:
                f.close()
            except OSError:  # a broken pipe to a child already gone
                pass


def _send_bag(sock: socket.socket, sid: str, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """One bag's arrays into a memfd, sent with its layout (kind, mag, dtype, shape, offset)."""
    layout, size = [], 0
    for kind in KINDS:
        for mag, a in arrays[kind].items():
            layout.append((kind, mag, a.dtype.str, a.shape, size))
            size += -(-a.nbytes // _ALIGN) * _ALIGN
    fd = os.memfd_create(f"bag-{sid}", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        for kind, mag, _, _, start in layout:
            data = memoryview(np.ascontiguousarray(arrays[kind][mag])).cast("B")
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], start + done)
        socket.send_fds(sock, [pickle.dumps((sid, layout, size), protocol=pickle.HIGHEST_PROTOCOL)], [fd])
    finally:
        os.close(fd)  # the parent holds its own reference once sent


def _send_error(sock: socket.socket, sid: str, e: BaseException) -> None:
    """The exception as the parent rebuilds it (:func:`_rebuild`): a SlideError by its parts (its
    constructor takes the slide and the cause, so it does not unpickle), another one pickled
    when it unpickles, else its type and message."""
    if isinstance(e, SlideError):
        error = ("slide", e.slide, e.cause)
    else:
        try:
            data = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(data)
            error = ("pickle", data)
        except Exception:  # noqa: BLE001 -- any exception that cannot cross is sent as text
            error = ("text", f"{sid}: {type(e).__name__}: {e}")
    sock.send(pickle.dumps((sid, error, 0), protocol=pickle.HIGHEST_PROTOCOL))


def _rebuild(error: tuple) -> BaseException:
    """The exception :func:`_send_error` sent."""
    if error[0] == "slide":
        return SlideError(error[1], error[2])
    return pickle.loads(error[1]) if error[0] == "pickle" else RuntimeError(error[1])


def _serve(inp, sock: socket.socket) -> None:
    """The child's loop: answer every slide asked on `inp` until EOF."""
    from numcodecs import blosc

    blosc.use_threads = False  # one core: the trainer has the others
    sock.send(READY)
    while True:
        try:
            jobs = pickle.load(inp)
        except EOFError:
            return
        for sid, stores, n_groups, values in jobs:
            try:
                arrays = bag_arrays(sid, *read_slide(stores), n_groups, values)
            except Exception as e:  # noqa: BLE001 -- handed to the parent, which raises it for this slide
                _send_error(sock, sid, e)
                continue
            _send_bag(sock, sid, arrays)


def main() -> None:
    """The child's entry point: the answer socket's fd is the first argument."""
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print goes to stderr
    with socket.socket(fileno=int(sys.argv[1])) as answers:
        try:
            _serve(sys.stdin.buffer, answers)
        except (BrokenPipeError, ConnectionResetError):  # the trainer is gone: nothing to answer
            pass
