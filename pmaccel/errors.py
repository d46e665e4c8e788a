"""User-facing errors: one line that says where the problem is and what to do."""

from __future__ import annotations


class PMAccelError(ValueError):
    """A problem with the user's input or settings (not a bug in pmaccel).

    The message is a single line: ``file:line: field: problem (what to do)``, with the parts that
    are known. The CLI prints it as is and exits non-zero.

    Args:
        message: what is wrong and what to do about it.
        file: the input file, if any.
        row: 1-based line (JSONL) or row number in ``file``.
        field: the offending field of the row or setting.
    """

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field, self.problem = file, row, field, message
        where = ""
        if file is not None:
            where = f"{file}:{row}: " if row is not None else f"{file}: "
        elif row is not None:
            where = f"row {row}: "
        if field is not None:
            where += f"{field}: "
        super().__init__((where + message).replace("\n", " "))

    def __reduce__(self) -> tuple:
        # pickled whole (file, row, field kept), as when an error goes from one process to another
        return _rebuild, (type(self), self.problem, self.file, self.row, self.field)


def _rebuild(cls: type[PMAccelError], problem: str, file: str | None, row: int | None,
             field: str | None) -> PMAccelError:
    return cls(problem, file=file, row=row, field=field)
