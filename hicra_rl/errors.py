"""Errors caused by the user's input, and how the command-line programs print them.

A bad path, file, row, field, model directory, lexicon or config value raises a :class:`UserInputError`
(alone, or mixed into ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` so that callers catching
those still do).  The entry points (``hicra-train``, ``hicra-sft``, ``hicra-eval``, ``hicra-sg``,
``hicra-report``) print such an error as one line, ``<command>: <message>``, on stderr and exit
:data:`USER_ERROR_EXIT`, without a traceback; any other exception is a bug and keeps its traceback.
``HYDRA_FULL_ERROR=1`` (the Hydra programs) or ``--debug`` (the argparse ones) shows the traceback of a
user error too.  Catalogue of what was tried: ``docs/bad-input.md``.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

USER_ERROR_EXIT = 2  # the exit status of every user-input error (config errors included), as argparse's


class UserInputError(Exception):
    """Base (and marker) of errors caused by the user's input, never by a bug; the message names the file,
    row, field or key."""


class BadInputError(UserInputError, ValueError):
    """A bad value in the user's input: a file's content, a row, a field, a setting."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A path given by the user that does not exist (or is not what it must be)."""


class InputExistsError(UserInputError, FileExistsError):
    """An output path given by the user that exists and must not be replaced."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (multi-line messages, such as OmegaConf's, joined with '; ')."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def hydra_full_error() -> bool:
    """``HYDRA_FULL_ERROR=1``: the user asked Hydra for complete tracebacks."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def print_user_error(prefix: str, err: BaseException) -> int:
    """Print ``<prefix>: <message>`` (one line) on stderr; returns :data:`USER_ERROR_EXIT`."""
    print(f"{prefix}: {one_line(err)}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


@contextmanager
def user_errors_in_one_line(prog: str, debug: bool = False):
    """Inside: a :class:`UserInputError` prints ``<prog>: <message>`` on stderr and exits
    :data:`USER_ERROR_EXIT` (re-raised with its traceback when ``debug``); anything else passes through."""
    try:
        yield
    except UserInputError as err:
        if debug:
            raise
        sys.exit(print_user_error(prog, err))


__all__ = ["USER_ERROR_EXIT", "BadInputError", "InputExistsError", "InputNotFoundError", "UserInputError",
           "hydra_full_error", "one_line", "print_user_error", "user_errors_in_one_line"]
