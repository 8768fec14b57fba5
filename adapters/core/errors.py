"""The one exception type a user can cause.

Every message says what is wrong, where (file, row, field) and how to fix it.
The CLI prints it without a traceback and the UI shows it as is.
"""


class StudioError(Exception):
    """A problem with the user's input (spec, dataset, model path, request)."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f" Fix: {self.fix}"
        return text


class CannotMerge(StudioError):
    """Raised by a method whose result cannot be folded into the base weights."""


def describe(error: BaseException) -> str:
    """The one-line text a user is shown for ``error``: a StudioError's own message (what, where,
    how to fix), anything else as ``Type: message`` so the cause is named without a traceback."""
    if isinstance(error, StudioError):
        return error.message
    return f"{type(error).__name__}: {error}"
