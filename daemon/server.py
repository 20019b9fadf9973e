"""The ZMQ edge: a ROUTER socket for requests, a PUB socket for events.

Every request gets exactly one reply, whatever it contains: checks run in a fixed order
(size 413, key 401, JSON and envelope 400, method 404, role 403, params 400) and only then
does a handler run. Handler errors become coded replies here, the one place besides the step
runner that catches. Nothing here waits on hardware, so one thread serves every client.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq
from pydantic import BaseModel, ValidationError

from daemon.api_context import Call, Services
from daemon.api_schema import API_SCHEMA, Request
from daemon.config import ApiConfig, Role
from daemon.errors import (
    ApiError,
    BadRequest,
    Forbidden,
    ServiceBusy,
    TooLarge,
    Unauthorised,
    UnknownMethod,
    error_code,
)
from daemon.methods import METHODS, Method
from daemon.security import API_DOMAIN, EVENTS_DOMAIN, CurveKeys, make_curve_server
from drivers.errors import ConfigError

log = structlog.get_logger(__name__)

#: Above this many times ``api.max_request_bytes`` a frame is dropped by ZMQ itself (the peer
#: is disconnected) instead of being read into memory to send a 413.
HARD_LIMIT_FACTOR = 4
#: Requests read in one go; consecutive target requests among them share one commit.
MAX_BATCH = 256
Socket = zmq.Socket[bytes]


def _bind(sock: Socket, address: str, setting: str) -> None:
    """Bind, or close the socket and raise ConfigError naming the setting."""
    try:
        sock.bind(address)
    except zmq.ZMQError as err:
        sock.close(linger=0)
        raise ConfigError(setting, f"cannot listen on {address}: {err}") from err


class ZmqPublisher:
    """The PUB socket; ``send`` is called under the EventBus lock."""

    def __init__(self, ctx: zmq.Context[Socket], address: str, keys: CurveKeys | None) -> None:
        self.sock: Socket = ctx.socket(zmq.PUB)
        self.sock.linger = 0
        self.sock.sndhwm = 100_000
        if keys is not None:
            make_curve_server(self.sock, keys, EVENTS_DOMAIN)
        _bind(self.sock, address, "api.events")

    def send(self, topic: str, body: bytes) -> None:
        self.sock.send_multipart([topic.encode(), body], flags=zmq.NOBLOCK)

    def close(self) -> None:
        self.sock.close(linger=0)


def _lenient_id(body: bytes) -> Any:
    """The request id if the body is a JSON object with a plain id, for the error reply."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and len(rid) <= 128:
            return rid
        if isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**53:
            return rid
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _validation_message(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors(include_url=False)[:10]:
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{prefix}{loc}: {e['msg']}" if loc else f"{prefix}{e['msg']}")
    return "; ".join(parts)


@dataclass
class _Item:
    """One request on its way through the server."""

    route: list[bytes]
    rid: Any = None
    method: str = ""
    run: Callable[[], BaseModel] | None = None
    group: bool = False
    code: int = 200
    reply: dict[str, Any] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def succeed(self, result: BaseModel) -> None:
        self.code = 200
        self.reply = {"schema": API_SCHEMA, "id": self.rid, "ok": True,
                      "result": result.model_dump(mode="json", by_alias=True)}

    def fail(self, err: BaseException) -> None:
        self.run = None
        self.code, etype, retryable = error_code(err)
        if self.code >= 500 and not isinstance(err, ServiceBusy):
            log.error("api.internal_error", method=self.method, error=str(err), exc_info=err)
        self.reply = {"schema": API_SCHEMA, "id": self.rid, "ok": False,
                      "error": {"code": self.code, "type": etype, "message": str(err),
                                "retryable": retryable}}


class ApiServer:
    """Binds the request socket and answers requests until ``stop`` is set."""

    def __init__(self, ctx: zmq.Context[Socket], cfg: ApiConfig, services: Services,
                 keys: CurveKeys | None) -> None:
        self.cfg = cfg
        self.services = services
        self.keys = keys
        self.sock: Socket = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.maxmsgsize = cfg.max_request_bytes * HARD_LIMIT_FACTOR
        if keys is not None:
            make_curve_server(self.sock, keys, API_DOMAIN)
        _bind(self.sock, cfg.bind, "api.bind")
        self.requests = 0

    def close(self) -> None:
        self.sock.close(linger=0)

    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(100):
                continue
            batch: list[list[zmq.Frame]] = []
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    break
            for reply in self.handle_batch(batch):
                try:
                    self.sock.send_multipart(reply, flags=zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("api.reply_dropped", reason="peer queue full")

    # ------------------------------------------------------------------ requests

    def handle(self, frames: list[zmq.Frame]) -> list[bytes] | None:
        """Answer one request (for tests and tools; ``serve`` uses ``handle_batch``)."""
        replies = self.handle_batch([frames])
        return replies[0] if replies else None

    def handle_batch(self, batch: list[list[zmq.Frame]]) -> list[list[bytes]]:
        """Answer requests in arrival order; consecutive ones that only add or remove targets
        commit together (one fsync), each in its own savepoint so that a refused request
        changes nothing. Every reply is sent only after its request's commit."""
        items = [self._prepare(frames) for frames in batch if len(frames) >= 2]
        i = 0
        while i < len(items):
            j = i
            while j < len(items) and items[j].group:
                j += 1
            if j - i > 1:
                self._execute_group(items[i:j])
                i = j
            else:
                self._execute(items[i])
                i += 1
        out = []
        for item in items:
            log.debug("api.request", method=item.method, code=item.code,
                      ms=round((time.perf_counter() - item.t0) * 1000, 3))
            out.append([*item.route, json.dumps(item.reply, allow_nan=False).encode()])
        return out

    def _prepare(self, frames: list[zmq.Frame]) -> _Item:
        identity = frames[0].bytes
        middle, last = frames[1:-1], frames[-1]
        item = _Item(route=[identity] + [b"" for f in middle if len(f) == 0])
        self.requests += 1
        try:
            size = sum(len(f) for f in frames[1:])
            if size > self.cfg.max_request_bytes:
                raise TooLarge(f"request of {size} bytes exceeds api.max_request_bytes "
                               f"({self.cfg.max_request_bytes})")
            body = last.bytes
            item.rid = _lenient_id(body)
            if any(len(f) for f in middle):
                raise BadRequest("a request is one frame (after an optional empty delimiter)")
            role, client = self._authenticate(last)
            req = self._parse(body)
            item.rid, item.method = req.id, req.method
            method, params = self._check(req, role)
            item.run = lambda: method.handler(Call(self.services, role, client), params)
            item.group = method.group_commit
        except Exception as err:  # noqa: BLE001 - the API edge turns every error into a reply
            item.fail(err)
        return item

    def _execute(self, item: _Item) -> None:
        if item.run is None:
            return
        try:
            item.succeed(item.run())
        except Exception as err:  # noqa: BLE001 - the API edge turns every error into a reply
            item.fail(err)

    def _execute_group(self, items: list[_Item]) -> None:
        bus = self.services.bus
        try:
            with bus.transaction():
                for item in items:
                    try:
                        with bus.transaction():
                            item.succeed(item.run())   # type: ignore[misc]
                    except Exception as err:  # noqa: BLE001 - its savepoint is rolled back
                        item.fail(err)
        except Exception as err:  # noqa: BLE001 - the commit failed: nothing is acknowledged
            log.error("api.group_commit_failed", error=str(err), requests=len(items))
            for item in items:
                if item.code == 200:
                    item.fail(err)

    def _authenticate(self, frame: zmq.Frame) -> tuple[Role, str]:
        if self.keys is None:
            return Role.OPERATOR, "local"
        user_id = frame.get("User-Id")
        client = self.keys.client_for_user_id(user_id if isinstance(user_id, str) else None)
        if client is None:
            raise Unauthorised("this client's CURVE key is not on the service's allowlist "
                               "(security.clients); ask the facility to add its public key")
        return client.role, client.name

    @staticmethod
    def _parse(body: bytes) -> Request:
        try:
            obj = json.loads(body, parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as err:
            raise BadRequest(f"request is not valid UTF-8 JSON: {err}") from None
        if not isinstance(obj, dict):
            raise BadRequest("request must be a JSON object with id, method and params")
        try:
            req = Request.model_validate(obj)
        except ValidationError as err:
            raise BadRequest("bad envelope: " + _validation_message(err, "")) from None
        if req.schema_version != API_SCHEMA:
            raise BadRequest(f"schema {req.schema_version} is not supported; this service "
                             f"speaks schema {API_SCHEMA}")
        return req

    def _check(self, req: Request, role: Role) -> tuple[Method, BaseModel]:
        method = METHODS.get(req.method)
        if method is None:
            raise UnknownMethod(f"unknown method {req.method!r}; methods: "
                                f"{', '.join(sorted(METHODS))}")
        if method.mutating and role != Role.OPERATOR:
            raise Forbidden(f"{req.method} changes things; role {role.value} may only read")
        try:
            params = method.params.model_validate_json(json.dumps(req.params))
        except ValidationError as err:
            accepted = ", ".join(sorted(method.params.model_fields)) or "none"
            raise BadRequest(f"{req.method}: " + _validation_message(err, "params.") +
                             f" (accepted params: {accepted})") from None
        if self.services.stopping() and method.mutating:
            raise ServiceBusy("the service is shutting down")
        return method, params


__all__ = ["ApiError", "ApiServer", "ZmqPublisher"]
