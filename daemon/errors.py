"""Errors the service raises at its API edge, each with the reply code it maps to.

Handlers raise these (or the driver hierarchy's ``InvalidState``/``LimitViolation``); the
server turns any of them into ``{"ok": false, "error": {code, type, message, retryable}}``.
Codes follow HTTP where a meaning exists (docs/api.md lists them).
"""

from __future__ import annotations

from typing import ClassVar

from drivers.errors import ClemdError, DeviceBusy, InvalidState


class ApiError(ClemdError):
    """A refused request; ``code`` and ``type`` go into the error reply unchanged."""

    code: ClassVar[int] = 500
    type: ClassVar[str] = "internal"


class BadRequest(ApiError, ValueError):
    """Malformed JSON, a wrong envelope, wrong types or out-of-range params."""

    code = 400
    type = "bad_request"


class Unauthorised(ApiError):
    """The client's CURVE key is not on the allowlist (``security.clients``)."""

    code = 401
    type = "unauthorised"


class Forbidden(ApiError):
    """The client's role (observer) may not call a mutating method."""

    code = 403
    type = "forbidden"


class NotFound(ApiError, KeyError):
    """A session, target or artifact id that does not exist."""

    code = 404
    type = "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownMethod(ApiError):
    """The envelope names a method the service does not have."""

    code = 404
    type = "unknown_method"


class TooLarge(ApiError):
    """The request is larger than ``api.max_request_bytes``."""

    code = 413
    type = "too_large"


class ServiceBusy(ApiError):
    """The service is shutting down or cannot take the request now; try again later."""

    code = 503
    type = "busy"
    retryable = True


class InstrumentUnavailable(ClemdError):
    """An instrument the config names cannot be built (driver missing, cannot connect).

    Raised at start, so the service does not start with a half-built instrument set.
    """


class WatchdogExpired(ClemdError):
    """A step's driver call did not return within the watchdog limit (``runner.watchdog_s``).

    Not retryable: the instrument's state is unknown, so the session is paused for an
    operator instead of sending more commands into a hung link.
    """


class JournalError(ClemdError):
    """The journal cannot be opened or is of a newer schema than this service understands."""


def error_code(exc: BaseException) -> tuple[int, str, bool]:
    """(code, type, retryable) of an exception reaching the API edge."""
    if isinstance(exc, ApiError):
        return exc.code, exc.type, exc.retryable
    if isinstance(exc, InvalidState):
        return 409, "invalid_state", exc.retryable
    if isinstance(exc, DeviceBusy):
        return 503, "busy", True
    if isinstance(exc, ValueError) and isinstance(exc, ClemdError):  # LimitViolation, ConfigError
        return 400, "bad_request", False
    if isinstance(exc, ClemdError):
        return 500, type(exc).__name__, exc.retryable
    return 500, "internal", False
