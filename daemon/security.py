"""CurveZMQ for the service: key files, the client allowlist with roles, and a ZAP handler.

On the request socket (ZAP domain ``clemd-api``) every well-formed CURVE client completes the
handshake; a key on the allowlist gets User-Id ``key:<name>``, any other key ``unknown``, and
the server answers that client's every request with 401. A structured refusal tells the
person at the other end what is wrong, and an unknown key can still do nothing. On the event
socket (``clemd-events``) unknown keys are refused at the handshake, since PUB cannot answer.
Without CURVE (loopback only) every client is an operator.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
import zmq.auth
from zmq.utils import z85

from daemon.config import Role, SecurityConfig
from drivers.errors import ConfigError

log = structlog.get_logger(__name__)

API_DOMAIN = b"clemd-api"
EVENTS_DOMAIN = b"clemd-events"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
UNKNOWN_USER = "unknown"


@dataclass(frozen=True)
class Client:
    name: str
    role: Role


@dataclass(frozen=True)
class CurveKeys:
    """The server's key pair and the allowlist (z85 public key -> client)."""

    public: bytes
    secret: bytes
    clients: dict[bytes, Client]

    def client_for_user_id(self, user_id: str | None) -> Client | None:
        if not user_id or not user_id.startswith("key:"):
            return None
        name = user_id[4:]
        return next((c for c in self.clients.values() if c.name == name), None)


def generate_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.key`` (public, share it) and ``name.key_secret`` (mode 0600)."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(folder), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_public(path: Path, field: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(field, f"cannot read public key {path}: {err}") from err
    if not public or len(public) != 40:
        raise ConfigError(field, f"{path} holds no CURVE public key")
    return bytes(public)


def load_secret(path: Path, field: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(field, f"cannot read secret key {path}: {err}") from err
    if not secret:
        raise ConfigError(field, f"{path} holds no secret key (use the .key_secret file)")
    return bytes(public), bytes(secret)


def load_keys(cfg: SecurityConfig) -> CurveKeys | None:
    """The server's keys and the allowlist, or None when CURVE is off."""
    if not cfg.curve:
        return None
    assert cfg.server_secret_key_file is not None  # checked by SecurityConfig
    public, secret = load_secret(cfg.server_secret_key_file, "security.server_secret_key_file")
    clients = {}
    for i, c in enumerate(cfg.clients):
        key = load_public(c.public_key_file, f"security.clients.{i}.public_key_file")
        clients[key] = Client(c.name, c.role)
    return CurveKeys(public, secret, clients)


def make_curve_server(sock: zmq.Socket[bytes], keys: CurveKeys, domain: bytes) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = domain


class ZapHandler:
    """Answers ZAP requests for the service's sockets on its own thread."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keys: CurveKeys) -> None:
        self._keys = keys
        self._stop = threading.Event()
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self._thread = threading.Thread(target=self._loop, name="zap", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            msg = self._sock.recv_multipart()
            self._sock.send_multipart(self._reply(msg))

    def _reply(self, msg: list[bytes]) -> list[bytes]:
        if len(msg) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = msg[:6]
        if version != b"1.0" or mechanism != b"CURVE" or len(msg) < 7:
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(msg[6])
        client = self._keys.clients.get(key)
        if client is not None:
            return [b"1.0", request_id, b"200", b"OK", f"key:{client.name}".encode(), b""]
        if domain == API_DOMAIN:
            log.warning("security.unknown_key", address=address.decode(errors="replace"),
                        key=key.decode())
            return [b"1.0", request_id, b"200", b"OK", UNKNOWN_USER.encode(), b""]
        log.warning("security.refused", domain=domain.decode(errors="replace"),
                    address=address.decode(errors="replace"), key=key.decode())
        return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
