"""User-facing errors: one line naming the cause and the fix, and an exit code."""

from __future__ import annotations


class EdgeBuildError(Exception):
    """An error the user can act on. The CLI prints it as one line and exits with `exit_code`.

    Exit codes: 1 = a check ran and failed (parity, accuracy gate, doctor errors);
    2 = the work could not run at all (bad input, missing file, bad config).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class CheckFailed(EdgeBuildError):
    """A check ran to completion and its verdict is 'fail' (exit 1)."""

    exit_code = 1
