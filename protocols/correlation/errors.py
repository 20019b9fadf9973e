"""Errors raised by the correlation code.

Correlation failures that are an *answer* ("no confident match") are not errors: they come
back as a status in the result. These classes are for input that cannot be used at all, so
that the CLI can turn them into exit status 2 with a one-line reason.
"""

from __future__ import annotations

from drivers.errors import ClemdError


class CorrelationError(ClemdError):
    """Base of the correlation errors; never retryable (the same input fails the same way)."""


class CorrelationInputError(CorrelationError, ValueError):
    """Point sets, targets or files that cannot be used: too few points, NaN, bad shape.

    Raise it before any computation starts; the message names the input and what is wrong,
    e.g. ``"LM points: 1 point(s), need at least 3"``.
    """
