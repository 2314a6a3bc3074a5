"""Errors and messages of the command line: one clear line per user mistake."""

from __future__ import annotations

import sys


class CLIError(Exception):
    """A user mistake, reported as one line on stderr with exit code 1."""


class Console:
    """Info lines on stderr (silent with ``--quiet``); results go to stdout."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        """Print an info line on stderr unless quiet."""
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        """Print a warning on stderr (also when quiet)."""
        print(f"captum-chains: warning: {message}", file=sys.stderr, flush=True)


def one_line(text: object, limit: int = 400) -> str:
    """``text`` (any object, e.g. an exception) on one line, at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
