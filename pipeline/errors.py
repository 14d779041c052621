"""One exception type per kind of failure. Bad input is a `PipelineError`: the CLI prints its one
line (`error: ...`) and exits 2, so a workflow can tell "fix your input" from a crash (exit 1).

- `SlideError`: a slide cannot be processed (unreadable, damaged, no magnification, its stores
  failed); a workflow may record it and go on with the other slides.
- `SheetError`: the slide sheet is invalid, or cannot give what a command needs (folds, classes).
- `ConfigError`: a config file, a CLI option or a file named by one (weights, checkpoint, mask
  PNG) is invalid, or a device this machine lacks is asked for.
- `AnnotationError`: an annotation file (QuPath GeoJSON, ASAP XML) cannot be read.
- `RunError`: a trained run cannot be used for prediction (missing models, moved weights).

Not bad input (exit 1, a traceback with --debug): `StoreError`, a write that would break a
store's layout (a bug in its caller).
"""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class PipelineError(Exception):
    """Bad input the user can fix; `str()` is the one line the user sees."""

    def __init__(self, message: object):
        super().__init__(one_line(message))


class SlideError(PipelineError):
    """A slide cannot be processed; `str()` is "<slide>: <cause>"."""

    def __init__(self, slide: str, cause: str):
        self.slide = str(slide)
        self.cause = one_line(cause)  # one line, always
        super().__init__(f"{self.slide}: {self.cause}")


class SheetError(PipelineError, ValueError):
    """The slide sheet is invalid or cannot give what is asked (folds, classes); raised before any work."""


class ConfigError(PipelineError, ValueError):
    """A config file, a CLI option or a file named by one is invalid; the line names the file or option."""


class AnnotationError(PipelineError, ValueError):
    """An annotation file cannot be read; the line names the file and the cause."""


class RunError(PipelineError):
    """A trained run cannot be used as asked (a model, fold, store or weights file is missing or differs)."""


class StoreError(RuntimeError):
    """A write would break a store's layout (rows out of order, non-finite values): a bug in the
    writer's caller, which names the slide and tile itself for bad data."""
