"""Errors about input shards: each names the file, and the column and row when there is one."""

from __future__ import annotations


class ShardError(ValueError):
    """Bad input data: a missing column, a ragged or null row, an unreadable file.

    Args:
        file: the shard (path) the problem is in.
        problem: what is wrong and what would be accepted.
        column: the column concerned, if any.
        row: the row (0-based, within the shard) concerned, if any.
    """

    def __init__(self, file: str, problem: str, column: str | None = None, row: int | None = None):
        self.file, self.problem, self.column, self.row = file, problem, column, row
        where = [f"file {file}"]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {problem}")

    def __reduce__(self):  # picklable across processes (datasets workers, Ray actors)
        return (type(self), (self.file, self.problem, self.column, self.row))


class ShardTypeError(ShardError, TypeError):
    """A column whose type cannot be sparsified (strings, bools, structs ...)."""


class ManifestError(ShardError):
    """A ``manifest.json`` that is not one pipesparse wrote: not JSON, a key missing or of the
    wrong type, or a shard name that is not a file inside the output folder."""


def find_shard_error(err: BaseException) -> ShardError | None:
    """The ShardError behind ``err``, which engines (Ray, ``datasets`` workers) may wrap."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ShardError) and hasattr(current, "problem"):
            cls = ShardTypeError if isinstance(current, TypeError) else ShardError
            return cls(current.file, current.problem, current.column, current.row)
        stack.extend([current.__context__, current.__cause__, getattr(current, "cause", None)])
    return None
