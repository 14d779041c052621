"""One exception type per kind of bad input, so the CLI prints one clear line and exits 2."""

from __future__ import annotations


def one_line(text: object) -> str:
    """`text` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class SlideError(Exception):
    """A slide cannot be processed; `str()` is the one line the user sees."""

    def __init__(self, slide: str, cause: str):
        self.slide = str(slide)
        self.cause = one_line(cause)  # one line, always
        super().__init__(f"{self.slide}: {self.cause}")


class SheetError(ValueError):
    """The slide sheet or the config is invalid; raised before any work starts."""


class ConfigError(SheetError):
    """A config file, a CLI option or a weights file is invalid (a SheetError, so callers that
    caught config errors as SheetError still do); `str()` is one line naming the file or option."""

    def __init__(self, message: str):
        super().__init__(one_line(message))
