"""The one error hierarchy of clemd.

Protocols and the daemon decide what to do with a failure by its class alone: retry
(``retryable``), pause the session, or fail the step. Library and transport errors are
translated into these classes at the driver edge (``raise ... from err``), so nothing
above the drivers ever catches ``OSError`` or ``zmq.ZMQError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pydantic import ValidationError


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


#: A dotted field name at the start of a validator's message ("low_dose.record.mag_index ...").
_LEADING_FIELD = re.compile(r"[A-Za-z_]\w*(?:\.\w+)*")
_VALUE_ERROR = "Value error, "


def validation_problems(err: ValidationError, prefix: str,
                        clean_loc: Callable[[list[str]], list[str]] | None = None
                        ) -> list[tuple[str, str]]:
    """Each pydantic problem as ``(dotted field, what is wrong)``, fields under ``prefix``.

    One rule for every config model, so the same mistake reads the same wherever it is made.
    A validator's ValueError arrives as "Value error, ..." located at the model it checks;
    by convention its message starts with the field it blames, which is appended to the
    location when that word is a key the validator was given, or when the location is empty
    (a top-level rule: the prefix alone would name nothing). A message that does not start
    with a field ("give exactly one of ...") stays at the model's location. ``clean_loc``
    rewrites each location first (the service config drops discriminated-union tags); an
    empty ``prefix`` names fields from the root.
    """
    problems: list[tuple[str, str]] = []
    for error in err.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        if clean_loc is not None:
            loc = clean_loc(loc)
        message = str(error["msg"])
        if error["type"] == "value_error":
            message = message.removeprefix(_VALUE_ERROR)
            loc += _blamed_field(message, error.get("input"), at_top=not loc)
        problem = (".".join(p for p in [prefix, *loc] if p) or "<root>", message)
        if problem not in problems:
            problems.append(problem)
    return problems


def _blamed_field(message: str, validated: Any, *, at_top: bool) -> list[str]:
    """The field a validator's message starts with, if it names one (else nothing)."""
    match = _LEADING_FIELD.match(message)
    if match is None:
        return []
    field = match.group(0)
    named_in_input = isinstance(validated, dict) and field.split(".", 1)[0] in validated
    return [field] if named_in_input or at_top else []


def config_error(err: ValidationError, prefix: str,
                 clean_loc: Callable[[list[str]], list[str]] | None = None) -> ConfigError:
    """A ConfigError reading as one line, ``field: problem; field: problem``.

    ``.field`` is the first offending field (what callers and tests key on); the message
    carries every problem so one run of ``check-config`` shows them all.
    """
    problems = validation_problems(err, prefix, clean_loc)
    field, first = problems[0]
    rest = "; ".join(f"{where}: {what}" for where, what in problems[1:])
    return ConfigError(field, f"{first}; {rest}" if rest else first)


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
