"""API contract over real sockets: envelopes, every method's shape, and bad input.

Bad input of every kind gets a structured error reply with the documented code, the service
keeps serving, and the journal is byte-for-byte unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from daemon.client import ClemdApiError, ClemdClient
from daemon.methods import METHODS
from tests.daemon.helpers import Running, journal_snapshot


def _req(method: str, params: dict[str, Any] | None = None, rid: Any = "r1",
         **extra: Any) -> bytes:
    return json.dumps({"schema": 1, "id": rid, "method": method, "params": params or {},
                       **extra}).encode()


def test_status_config_templates_devices(client: ClemdClient, service: Running) -> None:
    st = client.status()
    assert st["service"] == "clemd" and st["schema"] == 1 and st["state"] == "serving"
    assert st["clock"] == "virtual" and st["role"] == "operator"
    assert {d["name"] for d in st["devices"]} == {"compute", "lm", "em"}
    assert "exercise" in st["templates"]
    cfg = client.call("config")["config"]
    assert cfg["data_dir"] == str(service.cfg.data_dir)
    tpl = {t["name"]: t for t in client.call("templates.list")["templates"]}
    assert "positions" in tpl["exercise"]["params_schema"]["properties"]
    lm = client.call("devices.limits", {"device": "lm"})["limits"]
    assert lm["stage"]["x"]["upper"] > 0 and "20x" in lm["objectives"]
    em = client.call("devices.limits", {"device": "em"})["limits"]
    assert em["tilt"]["upper"] > 0 and "VIEW" in em["low_dose"]
    devices = client.call("devices.status")["devices"]
    assert all(d["worker"] == "idle" for d in devices)


def test_every_method_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [m for m in METHODS if f"`{m}`" not in doc]
    assert not missing, f"docs/api.md does not describe {missing}"


def test_session_runs_and_events_stream_in_order(client: ClemdClient) -> None:
    stream = client.subscribe([""])
    try:
        s = client.create_session("exercise", {"positions": 3})
        assert s["state"] == "created"
        client.call("sessions.start", {"session_id": s["id"]})
        done = client.wait_state(s["id"], {"completed", "paused", "failed"}, 60)
        assert done["state"] == "completed", done
        events = list(stream.events(0.5))
    finally:
        stream.close()
    detail = client.session(s["id"])
    assert detail["steps"] == [f"lm/pos-{i:03d}" for i in range(3)] + [
        f"em/pos-{i:03d}" for i in range(3)]
    assert sorted(a["path"] for a in detail["artifacts"]) == sorted(
        [f"lm/pos-{i:03d}.npy" for i in range(3)] + [f"em/pos-{i:03d}.npy" for i in range(3)])
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    kinds = {e["kind"] for e in events}
    assert {"state", "step", "progress", "image"} <= kinds
    progress = [e["payload"] for e in events if e["kind"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 6
    assert progress[0]["eta_s"] is not None
    images = [e["payload"] for e in events if e["kind"] == "image"]
    assert len(images) == 6 and all(i["path"].endswith(".npy") for i in images)
    # the journal replays exactly what was published
    replay = client.call("events.list", {"after_seq": seqs[0] - 1, "limit": 10000})["events"]
    assert [e["seq"] for e in replay][:len(seqs)] == seqs
    by_topic = client.call("events.list", {"topic_prefix": "image", "session_id": s["id"]})
    assert len(by_topic["events"]) == 6


def test_sessions_list_filter_and_token(client: ClemdClient) -> None:
    a = client.create_session("exercise", {"positions": 1})
    first = client.call("sessions.list")
    assert [x["id"] for x in first["sessions"]] == [a["id"]]
    assert client.call("sessions.list", {"states": ["completed"]})["sessions"] == []
    client.call("sessions.start", {"session_id": a["id"]})
    client.wait_state(a["id"], {"completed"}, 60)
    assert client.call("sessions.list")["token"] != first["token"]


def test_request_socket_also_serves_req_clients(service: Running) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    try:
        sock.connect(service.cfg.api.bind)
        sock.send(_req("status", rid=7))
        assert sock.poll(5000)
        reply = json.loads(sock.recv())
        assert reply["ok"] and reply["id"] == 7 and reply["schema"] == 1
    finally:
        sock.close()
        ctx.term()


BIG = 2 << 20

BAD: list[tuple[str, Callable[[str], bytes], int, str]] = [
    ("malformed-json", lambda sid: b"{not json", 400, "bad_request"),
    ("not-utf8", lambda sid: b"\xff\xfe\x00", 400, "bad_request"),
    ("not-an-object", lambda sid: b"[1, 2, 3]", 400, "bad_request"),
    ("no-method", lambda sid: json.dumps({"id": "r1"}).encode(), 400, "bad_request"),
    ("extra-envelope-key", lambda sid: _req("status", surprise=1), 400, "bad_request"),
    ("schema-2", lambda sid: json.dumps({"schema": 2, "id": "r1", "method": "status"}).encode(),
     400, "bad_request"),
    ("unknown-method", lambda sid: _req("sessions.explode"), 404, "unknown_method"),
    ("wrong-type", lambda sid: _req("sessions.create", {"template": "exercise",
                                                        "params": {"positions": "4"}}),
     400, "bad_request"),
    ("wrong-type-envelope", lambda sid: _req("sessions.get", {"session_id": 5}), 400,
     "bad_request"),
    ("out-of-range", lambda sid: _req("sessions.create", {"template": "exercise",
                                                          "params": {"positions": 0}}),
     400, "bad_request"),
    ("nan", lambda sid: ('{"id":"r1","method":"targets.submit","params":{"session_id":'
                         f'"{sid}","targets":[{{"frame":"lm_stage","x":NaN,"y":0}}]}}}}'
                         ).encode(),
     400, "bad_request"),
    ("coordinate-too-far", lambda sid: _req("targets.submit", {
        "session_id": sid, "targets": [{"frame": "lm_stage", "x": 1e9, "y": 0}]}),
     400, "bad_request"),
    ("bad-frame", lambda sid: _req("targets.submit", {
        "session_id": sid, "targets": [{"frame": "sky", "x": 1, "y": 0}]}), 400, "bad_request"),
    ("unknown-param", lambda sid: _req("sessions.get", {"session_id": sid, "verbose": True}),
     400, "bad_request"),
    ("unknown-template", lambda sid: _req("sessions.create", {"template": "nope"}), 404,
     "not_found"),
    ("no-such-session", lambda sid: _req("sessions.start", {"session_id": "s-00000000"}), 404,
     "not_found"),
    ("no-such-artifact", lambda sid: _req("targets.submit", {
        "session_id": sid, "targets": [{"frame": "lm_image:99", "x": 1, "y": 0}]}), 404,
     "not_found"),
    ("invalid-state", lambda sid: _req("sessions.pause", {"session_id": sid}), 409,
     "invalid_state"),
    ("confirm-nothing", lambda sid: _req("sessions.confirm", {"session_id": sid, "key": "x"}),
     409, "invalid_state"),
    ("auto-id-reserved", lambda sid: _req("targets.submit", {
        "session_id": sid, "targets": [{"id": "auto-1", "frame": "lm_stage", "x": 1, "y": 0}]}),
     400, "bad_request"),
    ("oversized", lambda sid: _req("status", {"pad": "x" * BIG}), 413, "too_large"),
]


@pytest.mark.parametrize("make,code,etype", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_changes_nothing(service: Running, client: ClemdClient,
                                                  make: Callable[[str], bytes], code: int,
                                                  etype: str) -> None:
    sid = client.create_session("exercise", {"positions": 1})["id"]
    before = journal_snapshot(service.cfg.data_dir)
    reply = client.exchange(make(sid), "r1")
    assert reply["ok"] is False and reply["schema"] == 1
    err = reply["error"]
    assert (err["code"], err["type"]) == (code, etype), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["retryable"], bool)
    assert journal_snapshot(service.cfg.data_dir) == before
    assert client.status()["state"] == "serving"


def test_unknown_method_lists_the_methods(client: ClemdClient) -> None:
    with pytest.raises(ClemdApiError) as info:
        client.call("nope")
    assert info.value.code == 404 and "sessions.create" in info.value.message


def test_wrong_params_list_the_accepted_ones(client: ClemdClient) -> None:
    with pytest.raises(ClemdApiError) as info:
        client.call("events.list", {"after": 3})
    assert info.value.code == 400 and "after_seq" in info.value.message


def test_multi_frame_garbage_gets_one_reply(service: Running) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(service.cfg.api.bind)
        sock.send_multipart([b"junk", b"", _req("status")])
        assert sock.poll(5000)
        frames = sock.recv_multipart()
        reply = json.loads(frames[-1])
        assert reply["error"]["code"] == 400
    finally:
        sock.close()
        ctx.term()


def test_shutdown_stops_serving(make_service: Callable[..., Running]) -> None:
    running = make_service()
    c = running.client()
    assert c.call("shutdown") == {"stopping": True}
    running.thread.join(10)
    assert not running.thread.is_alive()


def test_unconfigured_device_is_not_found(make_service: Callable[..., Running]) -> None:
    running = make_service(em=None)
    c = running.client()
    with pytest.raises(ClemdApiError) as info:
        c.call("devices.limits", {"device": "em"})
    assert info.value.code == 404
    with pytest.raises(ClemdApiError) as info:
        c.create_session("exercise", {"positions": 1})
    assert info.value.code == 409 and "em" in info.value.message
    s = c.create_session("exercise", {"positions": 2, "em": False}, start=True)
    assert c.wait_state(s["id"], {"completed"}, 60)["steps_done"] == 2
