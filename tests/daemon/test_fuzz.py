"""Fuzz the request socket with thousands of random frames: every frame gets a well-formed
reply (or, for multi-frame junk, one reply), the service stays up and correct afterwards, and
the journal changes only through requests that were acknowledged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.config import config_from_mapping
from daemon.methods import METHODS
from tests.daemon.helpers import Running, config_dict, journal_snapshot, start_service

CODES = {400, 401, 403, 404, 409, 413, 500, 503}
SAFE_METHODS = sorted(m for m in METHODS if m != "shutdown")
PARAM_NAMES = sorted({f for m in METHODS.values() for f in m.params.model_fields} |
                     {"positions", "frame", "x", "y", "id"})

json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) |
             st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20) |
             st.sampled_from(["exercise", "lm_stage", "em_stage", "lm_image:1"]))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) |
                          st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)
envelope = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=12), st.integers(), st.none(), st.floats()),
     "method": st.one_of(st.sampled_from(SAFE_METHODS), st.text(max_size=20)),
     "params": st.one_of(st.dictionaries(st.sampled_from(PARAM_NAMES), json_value, max_size=4),
                         json_value)},
    optional={"schema": st.one_of(st.just(1), st.integers(), st.text(max_size=3)),
              "extra": json_value})
target = st.fixed_dictionaries(
    {"frame": st.sampled_from(["lm_stage", "em_stage", "lm_image:1", "sky"]),
     "x": st.floats(-2e6, 2e6), "y": st.integers(-10, 10)},
    optional={"id": st.text(max_size=6), "label": st.text(max_size=5), "z": json_leaf})
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "template": st.sampled_from(["exercise", "nope"]),
    "params": st.fixed_dictionaries({}, optional={"positions": st.integers(-1, 3),
                                                  "em": st.booleans(), "lm": st.booleans()}),
    "start": st.booleans(), "name": st.text(max_size=8),
    "targets": st.lists(target, max_size=3), "limit": st.integers(-1, 20000),
    "device": st.sampled_from(["lm", "em", "xx"]), "position": st.integers(-1, 3),
}


def _param(field: str) -> st.SearchStrategy[Any]:
    if field not in PLAUSIBLE:
        return json_value
    plausible = PLAUSIBLE[field]     # mostly plausible values, so deep paths get exercised
    return st.integers(0, 3).flatmap(lambda i: json_value if i == 0 else plausible)


near_valid = st.sampled_from(SAFE_METHODS).flatmap(lambda m: st.fixed_dictionaries({
    "id": st.text(min_size=1, max_size=8), "method": st.just(m),
    "params": st.fixed_dictionaries({}, optional={f: _param(f)
                                                  for f in METHODS[m].params.model_fields})}))
body = st.one_of(
    near_valid.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    json_value.map(lambda v: json.dumps(v).encode()),
    envelope.map(lambda v: json.dumps(v).encode()),
    envelope.map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]),
)
frames = st.one_of(body.map(lambda b: [b]),
                   st.lists(st.one_of(body, st.just(b"")), min_size=2, max_size=3))


class Fuzzer:
    def __init__(self, running: Running) -> None:
        self.running = running
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(running.cfg.api.bind)
        self.sent = 0
        self.created: set[str] = set()
        self.acked_targets: dict[tuple[str, str], dict[str, Any]] = {}

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def send(self, parts: list[bytes]) -> dict[str, Any]:
        self.sock.send_multipart(parts)
        self.sent += 1
        assert self.sock.poll(10_000), f"no reply to {parts!r}"
        reply_frames = self.sock.recv_multipart()
        assert all(f == b"" for f in reply_frames[:-1])
        reply: dict[str, Any] = json.loads(reply_frames[-1])
        assert reply["schema"] == 1 and isinstance(reply["ok"], bool)
        if reply["ok"]:
            assert isinstance(reply["result"], dict)
        else:
            err = reply["error"]
            assert err["code"] in CODES and err["code"] != 500, err
            assert isinstance(err["type"], str) and isinstance(err["message"], str)
            assert isinstance(err["retryable"], bool)
        self._remember(parts[-1], reply)
        return reply

    def _remember(self, raw: bytes, reply: dict[str, Any]) -> None:
        if not reply["ok"]:
            return
        req = json.loads(raw)
        result = reply["result"]
        if req["method"] in ("sessions.create", "jobs.enqueue"):
            self.created.add(result["id"])
        if req["method"] == "targets.submit":
            for t in result["targets"]:
                self.acked_targets[(req["params"]["session_id"], t["id"])] = t


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Fuzzer]]:
    data = tmp_path_factory.mktemp("fuzz")
    running = start_service(config_from_mapping(config_dict(data / "data")))
    fuzzer = Fuzzer(running)
    yield running, fuzzer
    fuzzer.close()
    running.stop()


@settings(max_examples=2500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(parts=frames)
def test_random_frames_get_structured_replies(fuzzed: tuple[Running, Fuzzer],
                                              parts: list[bytes]) -> None:
    fuzzed[1].send(parts)


def test_service_is_alive_and_correct_after_fuzzing(fuzzed: tuple[Running, Fuzzer]) -> None:
    running, fuzzer = fuzzed
    assert fuzzer.sent >= 2500
    assert fuzzer.created, "the fuzz never reached a handler that creates something"
    c = running.client()
    assert c.status()["state"] == "serving"
    # the journal holds exactly the sessions whose creation was acknowledged
    listed = {s["id"] for s in c.call("sessions.list")["sessions"]}
    assert listed == fuzzer.created
    for (sid, tid), t in fuzzer.acked_targets.items():
        got = {x["id"]: x for x in c.call("targets.list", {"session_id": sid})["targets"]}
        assert got[tid]["x"] == t["x"]
    s = c.create_session("exercise", {"positions": 2}, start=True)
    assert c.wait_state(s["id"], {"completed", "paused", "failed"}, 120)["state"] == "completed"


@pytest.fixture
def observer_service(tmp_path: Path) -> Iterator[tuple[Running, Path]]:
    from daemon.security import generate_keys
    keys = tmp_path / "keys"
    for name in ("server", "watcher"):
        generate_keys(keys, name)
    cfg = config_from_mapping(config_dict(tmp_path / "data", security={
        "curve": True, "server_secret_key_file": str(keys / "server.key_secret"),
        "clients": [{"name": "watcher", "public_key_file": str(keys / "watcher.key"),
                     "role": "observer"}]}))
    running = start_service(cfg)
    yield running, keys
    running.stop()


def test_observer_fuzz_changes_nothing(observer_service: tuple[Running, Path]) -> None:
    from daemon.client import CurveClientKeys
    running, keys = observer_service
    c = running.client(CurveClientKeys(keys / "watcher.key_secret", keys / "server.key"))
    before = journal_snapshot(running.cfg.data_dir)

    @settings(max_examples=600, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=envelope.map(lambda v: {**v, "method": v["method"], "id": "x"}))
    def one(req: dict[str, Any]) -> None:
        reply = c.exchange(json.dumps(req).encode(), "x")
        if reply["ok"]:
            assert not METHODS[req["method"]].mutating
        else:
            assert reply["error"]["code"] in CODES - {500}

    one()
    assert journal_snapshot(running.cfg.data_dir) == before
    assert c.status()["state"] == "serving"
