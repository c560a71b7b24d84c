"""Typed errors: each names the offending name, shape or key and what would be accepted."""

from __future__ import annotations


class UnknownDataError(KeyError, ValueError):
    """A name that no data was registered under.

    A ``KeyError`` (the project's convention for unknown names) that is also a
    ``ValueError``, which is what torch.ao's data sparsifier raises, so code written
    against the reference keeps catching it.
    """

    def __init__(self, name: object, known: list[str]):
        self.name, self.known = name, list(known)
        shown = ", ".join(repr(k) for k in self.known[:10]) or "none"
        more = f" (+{len(self.known) - 10} more)" if len(self.known) > 10 else ""
        super().__init__(f"no data registered under name {name!r}; registered names: {shown}{more}")

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])

    def __reduce__(self):  # picklable, so it crosses process boundaries (workers, Ray)
        return type(self), (self.name, self.known)


class CorruptStateError(ValueError):
    """A state_dict that is not one this sparsifier wrote: missing keys, wrong types or shapes."""
