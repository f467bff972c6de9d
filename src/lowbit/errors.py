"""User-facing errors.

Anything a user can cause (a bad path, an unknown scheme, empty data) raises `LowbitError`
with one clear sentence. The CLI prints it as one line and exits with code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations


class LowbitError(Exception):
    """A failure caused by the user's input or environment, with a message that says what to do."""

    exit_code = 2
