"""The one error hierarchy of clemd.

Protocols and the daemon decide what to do with a failure by its class alone: retry
(``retryable``), pause the session, or fail the step. Library and transport errors are
translated into these classes at the driver edge (``raise ... from err``), so nothing
above the drivers ever catches ``OSError`` or ``zmq.ZMQError``.
"""

from __future__ import annotations

from typing import ClassVar


class ClemdError(Exception):
    """Base of every error clemd raises on purpose.

    ``retryable`` says whether repeating the same call can help (a dropped socket) or not
    (a limit violation: the same request would be refused again).
    """

    retryable: ClassVar[bool] = False


class ConfigError(ClemdError, ValueError):
    """A configuration value is invalid; raised at construction, before anything moves.

    The message always names the offending field, e.g. ``lm.objectives.100x.pixel_size_um``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class LimitViolation(ClemdError, ValueError):
    """A requested position, tilt or magnification lies outside the configured limits.

    Raised by the contract's public methods before any command reaches an instrument, so a
    refused request never leaves hardware half-moved.
    """


class InvalidState(ClemdError):
    """The request is not allowed in the current state (e.g. acquire while aborting)."""


class ConnectionLost(ClemdError):
    """The link to an instrument dropped; reconnecting and resending may succeed."""

    retryable = True


class ProtocolError(ConnectionLost):
    """A reply was truncated or inconsistent; the connection is closed and must be reopened."""


class DeviceTimeout(ClemdError):
    """An instrument did not answer a status call within its configured timeout."""

    retryable = True


class DeviceBusy(ClemdError):
    """The instrument is running something else (SerialEM busy, another script in control)."""

    retryable = True


class HardwareFault(ClemdError):
    """The instrument reported an error it cannot recover from by itself (script error, fault)."""


class AutofocusFailed(ClemdError):
    """Autofocus measured nothing usable: the focus area held no contrast to correlate (an
    empty hole, a grid bar, a dark beam) or SerialEM reported the autofocus failed/aborted.

    Not retryable: the same area gives the same images. A protocol keeps the defocus it has
    (or its height model) and says so; the lens is left as it was.
    """


class Aborted(ClemdError):
    """The operation was cancelled by an abort request or by the operator pressing STOP."""
