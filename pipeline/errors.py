"""One exception type for every per-slide failure, so the CLI can print one clear line."""

from __future__ import annotations


class SlideError(Exception):
    """A slide cannot be processed; `str()` is the one line the user sees."""

    def __init__(self, slide: str, cause: str):
        self.slide = str(slide)
        self.cause = " ".join(str(cause).split())  # one line, always
        super().__init__(f"{self.slide}: {self.cause}")


class SheetError(ValueError):
    """The slide sheet or the config is invalid; raised before any work starts."""
