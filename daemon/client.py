"""A small Python client for clemd: one request socket, optional event subscriptions.

    with ClemdClient("tcp://127.0.0.1:5555") as c:
        s = c.call("sessions.create", {"template": "exercise", "params": {"positions": 4}})
        c.call("sessions.start", {"session_id": s["id"]})
        c.wait_state(s["id"], {"completed"}, timeout_s=60)

Errors come back as ``ClemdApiError`` (with ``code``, ``type``, ``retryable``); a request
without a reply within ``timeout_s`` raises ``ClientTimeout`` after the socket was reset, so
a late reply can never be taken for the next request's. One client per thread.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import zmq
import zmq.auth

API_SCHEMA = 1
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
DEFAULT_EVENTS = "tcp://127.0.0.1:5556"


class ClemdApiError(Exception):
    """The service refused a request; ``code`` as in docs/api.md."""

    def __init__(self, code: int, type_: str, message: str, retryable: bool) -> None:
        super().__init__(f"{code} {type_}: {message}")
        self.code = code
        self.type = type_
        self.message = message
        self.retryable = retryable


class ClientTimeout(ClemdApiError):
    """No reply within ``timeout_s``; the socket was reset. Safe to retry idempotent calls."""

    def __init__(self, method: str, timeout_s: float) -> None:
        super().__init__(0, "timeout", f"no reply to {method} within {timeout_s:g} s", True)


class CurveClientKeys:
    """The client's key pair and the server's public key, read from files."""

    def __init__(self, secret_key_file: Path, server_public_key_file: Path) -> None:
        public, secret = zmq.auth.load_certificate(str(secret_key_file))
        if not secret:
            raise ValueError(f"{secret_key_file} holds no secret key")
        server_public, _ = zmq.auth.load_certificate(str(server_public_key_file))
        self.public, self.secret, self.server = bytes(public), bytes(secret), bytes(server_public)

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server


class EventStream:
    """A SUB socket; iterate ``events(timeout_s)`` for decoded event envelopes."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], address: str, topics: Iterable[str],
                 keys: CurveClientKeys | None) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.linger = 0
        if keys is not None:
            keys.apply(self.sock)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.sock.connect(address)

    def next(self, timeout_s: float) -> dict[str, Any] | None:
        """The next event, or None after ``timeout_s``."""
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        _topic, body = self.sock.recv_multipart()
        event: dict[str, Any] = json.loads(body)
        return event

    def events(self, timeout_s: float) -> Iterator[dict[str, Any]]:
        """Events until none arrives for ``timeout_s``."""
        while (ev := self.next(timeout_s)) is not None:
            yield ev

    def close(self) -> None:
        self.sock.close(linger=0)


class ClemdClient:
    """Request/reply over a DEALER socket; typed errors; socket reset after a timeout."""

    def __init__(self, address: str = DEFAULT_ADDRESS, events: str = DEFAULT_EVENTS, *,
                 timeout_s: float = 10.0, keys: CurveClientKeys | None = None) -> None:
        self.address = address
        self.events_address = events
        self.timeout_s = timeout_s
        self.keys = keys
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-{id(self) & 0xFFFF:x}"
        self._sock = self._connect()

    def _connect(self) -> zmq.Socket[bytes]:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        if self.keys is not None:
            self.keys.apply(sock)
        sock.connect(self.address)
        return sock

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ raw

    def call(self, method: str, params: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> dict[str, Any]:
        """Send one request and return its ``result``; raise ClemdApiError on refusal."""
        rid = f"{self._prefix}-{next(self._ids)}"
        body = json.dumps({"schema": API_SCHEMA, "id": rid, "method": method,
                           "params": params or {}}).encode()
        reply = self.exchange(body, rid, method, timeout_s)
        if reply.get("ok"):
            result: dict[str, Any] = reply["result"]
            return result
        err = reply.get("error") or {}
        raise ClemdApiError(int(err.get("code", 500)), str(err.get("type", "internal")),
                            str(err.get("message", "")), bool(err.get("retryable", False)))

    def exchange(self, body: bytes, rid: Any, method: str = "?",
                 timeout_s: float | None = None) -> dict[str, Any]:
        """Send raw bytes; return the decoded reply whose id is ``rid`` (or has none)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        self._sock.send(body)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._sock.poll(int(remaining * 1000) + 1):
                self._sock.close(linger=0)
                self._sock = self._connect()
                raise ClientTimeout(method, timeout)
            reply: dict[str, Any] = json.loads(self._sock.recv())
            if reply.get("id") in (rid, None):
                return reply

    def subscribe(self, topics: Iterable[str] = ("",)) -> EventStream:
        return EventStream(self._ctx, self.events_address, topics, self.keys)

    # ------------------------------------------------------------------ conveniences

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def session(self, session_id: str) -> dict[str, Any]:
        return self.call("sessions.get", {"session_id": session_id})

    def create_session(self, template: str, params: dict[str, Any] | None = None,
                       name: str = "", start: bool = False) -> dict[str, Any]:
        return self.call("sessions.create", {"template": template, "params": params or {},
                                             "name": name, "start": start})

    def submit_targets(self, session_id: str,
                       targets: list[dict[str, Any]]) -> dict[str, Any]:
        return self.call("targets.submit", {"session_id": session_id, "targets": targets})

    def wait_state(self, session_id: str, states: set[str], timeout_s: float) -> dict[str, Any]:
        """Wait until the session is in one of ``states``; woken by its state events, with a
        status read at least every half second (an event may be missed while connecting)."""
        stream = self.subscribe([f"state.{session_id}"])
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                info: dict[str, Any] = self.call("sessions.get",
                                                 {"session_id": session_id})["session"]
                if info["state"] in states:
                    return info
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"session {session_id} is {info['state']} after "
                                       f"{timeout_s:g} s; waited for {sorted(states)}")
                stream.next(min(0.5, remaining))
        finally:
            stream.close()
