"""Errors a user can act on: each names the file and what is wrong, in one line."""

from __future__ import annotations

from pathlib import Path


def one_line(cause: BaseException | str, limit: int | None = None) -> str:
    """An exception's message (or any text) as one line, never empty: decoder plugins and
    nibabel list causes on lines of their own, and a MemoryError has no message at all.
    ``limit``: cut to that many characters, an ellipsis last."""
    text = " ".join(str(cause).split())
    if not text and isinstance(cause, BaseException):
        text = type(cause).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class IchscanError(Exception):
    """Base class: bad input or a problem the user can fix. The CLI prints it without a
    traceback and exits 2."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        return (self.__class__, (self.path, self.problem))


class InputError(IchscanError):
    """The file or folder cannot be read as head CT (corrupt, wrong type, wrong modality...)."""


class MissingDecoderError(InputError):
    """Pixel data uses a transfer syntax for which no decoder plugin is installed."""
