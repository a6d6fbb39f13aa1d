"""Where a data problem is, and the error that says it: :class:`BadDataError` and
:func:`data_location`, one convention shared by every reader (MMEB-train, MMEB-eval, video
annotations)."""

from __future__ import annotations

from ..errors import InvalidArgument

__all__ = ["BadDataError", "data_location"]


class BadDataError(InvalidArgument):
    """A row (or a whole file) of the training data that cannot be used; says where and why."""

    def __init__(self, source: str, row: int | None, reason: str, line: int | None = None,
                 hint: bool | str = True):
        self.source, self.row, self.reason, self.line, self.hint = source, row, reason, line, hint
        msg = f"{data_location(source, row, line)}: {reason}"
        if isinstance(hint, str):
            msg += hint
        elif hint and row is not None:
            msg += " (pass skip_bad_rows=True / --skip-bad-rows to skip and log such rows)"
        super().__init__(msg)

    def at_line(self, line: int | None) -> "BadDataError":
        """The same error, located at ``line`` of its file (when it was raised without one)."""
        if line is None or self.line is not None:
            return self
        return BadDataError(self.source, self.row, self.reason, line, hint=self.hint)


def data_location(source: str, row: int | None = None, line: int | None = None) -> str:
    """Where a data problem is, one convention for every reader: ``FILE:LINE`` where the file has
    lines (.jsonl, .csv, .txt; LINE 1-based, blank lines counted, as an editor shows it),
    ``FILE: row N`` where it has none (.parquet, .json; N 1-based; ``row`` is given 0-based), and
    ``FILE`` for a problem of the whole file."""
    if line is not None:
        return f"{source}:{line}"
    if row is not None:
        return f"{source}: row {row + 1}"
    return source

