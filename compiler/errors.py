"""Exceptions of the compiler.

Every error a user can cause is a `CompilerError` whose message names the problem and the fix,
so front doors (CLI, backend, Python API) can show one line instead of a traceback.
"""

from __future__ import annotations


class CompilerError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class UserInputError(CompilerError):
    """Bad input from the user: a missing file, an unknown name, a malformed option."""


class CaptureError(CompilerError):
    """The model could not be captured into the ATen IR."""


class PassError(CompilerError):
    """A pass failed or broke the graph (for example, numeric verification failed)."""


class Unsupported(CompilerError):
    """A backend cannot lower this op or shape; the caller falls back to ATen and warns."""
