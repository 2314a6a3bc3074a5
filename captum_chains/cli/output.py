"""Errors and messages of the command line: one clear line per user mistake."""

from __future__ import annotations

import sys


class CLIError(Exception):
    """A user mistake, reported as one line on stderr with exit code 1."""


# ----------------------------------------------------------------------------- output
class Console:
    """Info lines on stderr (silent with ``--quiet``); results go to stdout."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        print(f"captum-chains: warning: {message}", file=sys.stderr, flush=True)


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
