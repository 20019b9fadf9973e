"""Targets: acknowledged after commit, idempotent by id, atomic per request, in known frames."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.client import ClemdApiError, ClemdClient
from tests.daemon.helpers import Running, journal_snapshot


def _t(tid: str | None, x: float, frame: str = "lm_stage", **kw: object) -> dict[str, object]:
    t: dict[str, object] = {"frame": frame, "x": x, "y": 2.0, **kw}
    if tid is not None:
        t["id"] = tid
    return t


def test_submit_list_remove_with_events(client: ClemdClient) -> None:
    sid = client.create_session("exercise", {"positions": 1})["id"]
    stream = client.subscribe([f"target.{sid}"])
    try:
        res = client.submit_targets(sid, [_t("v1", 1.0, label="virus", z=0.5,
                                             meta={"score": 0.9}), _t(None, 2.0)])
        assert res["created"] == 2 and res["rev"] == 1
        ids = [t["id"] for t in res["targets"]]
        assert ids[0] == "v1" and ids[1].startswith("auto-")
        again = client.submit_targets(sid, [_t("v1", 1.0, label="virus", z=0.5,
                                               meta={"score": 0.9})])
        assert again["created"] == 0 and again["rev"] == 1        # a retry, not a duplicate
        listed = client.call("targets.list", {"session_id": sid})
        assert [t["id"] for t in listed["targets"]] == ids and listed["rev"] == 1
        removed = client.call("targets.remove", {"session_id": sid, "target_ids": ["v1"]})
        assert removed == {"removed": ["v1"], "rev": 2}
        assert [t["id"] for t in client.call("targets.list", {"session_id": sid})["targets"]] \
            == ids[1:]
        everything = client.call("targets.list", {"session_id": sid, "include_removed": True})
        assert everything["targets"][0]["removed_at"] is not None
        first = stream.next(5)
        # the subscription may have joined after the first event; the journal has them all
        events = client.call("events.list", {"topic_prefix": f"target.{sid}"})["events"]
    finally:
        stream.close()
    assert first is not None
    assert [(e["payload"]["action"], e["payload"]["rev"]) for e in events] == [
        ("added", 1), ("removed", 2)]


@pytest.mark.parametrize("case,code", [
    ("conflict", 409), ("removed-id", 409), ("duplicate-in-request", 400),
    ("one-bad-in-batch", 404), ("wrong-artifact-kind", 400), ("remove-unknown", 404)])
def test_refusals_commit_nothing(service: Running, client: ClemdClient, case: str,
                                 code: int) -> None:
    sid = client.create_session("exercise", {"positions": 1, "checkpoint": True},
                                start=True)["id"]
    client.wait_state(sid, {"waiting_operator"}, 60)
    art = client.session(sid)["artifacts"][0]["id"]           # an lm_image of this session
    client.submit_targets(sid, [_t("a", 1.0), _t("gone", 3.0)])
    client.call("targets.remove", {"session_id": sid, "target_ids": ["gone"]})
    before = journal_snapshot(service.cfg.data_dir)
    call = {
        "conflict": ("targets.submit", {"session_id": sid, "targets": [_t("a", 9.0)]}),
        "removed-id": ("targets.submit", {"session_id": sid, "targets": [_t("gone", 3.0)]}),
        "duplicate-in-request": ("targets.submit", {"session_id": sid,
                                                    "targets": [_t("b", 1.0), _t("b", 1.0)]}),
        "one-bad-in-batch": ("targets.submit", {"session_id": sid, "targets": [
            _t("c", 1.0), _t("d", 1.0, frame="lm_image:424242")]}),
        "wrong-artifact-kind": ("targets.submit", {"session_id": sid, "targets": [
            _t("e", 1.0, frame=f"em_image:{art}")]}),
        "remove-unknown": ("targets.remove", {"session_id": sid, "target_ids": ["a", "zz"]}),
    }[case]
    with pytest.raises(ClemdApiError) as info:
        client.call(*call)
    assert info.value.code == code, info.value
    assert journal_snapshot(service.cfg.data_dir) == before


def test_targets_in_an_image_frame(client: ClemdClient) -> None:
    s = client.create_session("exercise", {"positions": 2, "checkpoint": True}, start=True)
    client.wait_state(s["id"], {"waiting_operator"}, 60)
    art = client.session(s["id"])["artifacts"][0]
    assert art["kind"] == "lm_image"
    ok = client.submit_targets(s["id"], [_t("px", 31.5, frame=f"lm_image:{art['id']}")])
    assert ok["targets"][0]["frame"] == f"lm_image:{art['id']}"
    t = client.create_session("exercise", {"positions": 1})
    with pytest.raises(ClemdApiError) as info:        # artifacts belong to their session
        client.submit_targets(t["id"], [_t("p", 10.0, frame=f"lm_image:{art['id']}")])
    assert info.value.code == 404
    client.call("sessions.abort", {"session_id": s["id"]})
    with pytest.raises(ClemdApiError) as info:        # ended sessions take no more targets
        client.submit_targets(s["id"], [_t("p", 10.0, frame=f"lm_image:{art['id']}")])
    assert info.value.code == 409


def test_visit_targets_reads_the_committed_targets(client: ClemdClient) -> None:
    s = client.create_session("exercise", {"positions": 1, "lm": False, "em": False,
                                           "visit_targets": True})
    client.submit_targets(s["id"], [_t("n1", 5.0, frame="em_stage"),
                                    _t("l1", 5.0, frame="lm_stage")])
    client.call("sessions.start", {"session_id": s["id"]})
    done = client.wait_state(s["id"], {"completed", "paused", "failed"}, 60)
    assert done["state"] == "completed"
    assert client.session(s["id"])["steps"] == ["targets/snapshot", "em/target-n1"]


def test_pipelined_submissions_commit_in_groups_without_mixing_up_refusals(
        service: Running, client: ClemdClient) -> None:
    import json

    import zmq
    sid = client.create_session("exercise", {"positions": 1})["id"]
    client.submit_targets(sid, [_t("taken", 0.0)])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(service.cfg.api.bind)
        expected_ok = set()
        for i in range(300):
            bad = i % 10 == 3
            target = _t("taken", 5.0) if bad else _t(f"p{i}", float(i))
            sock.send(json.dumps({"id": i, "method": "targets.submit", "params": {
                "session_id": sid, "targets": [target]}}).encode())
            if not bad:
                expected_ok.add(i)
        replies: dict[int, dict[str, Any]] = {}
        while len(replies) < 300:
            assert sock.poll(10_000)
            r = json.loads(sock.recv())
            replies[r["id"]] = r
    finally:
        sock.close()
        ctx.term()
    assert {i for i, r in replies.items() if r["ok"]} == expected_ok
    assert all(r["error"]["code"] == 409 for r in replies.values() if not r["ok"])
    listed = client.call("targets.list", {"session_id": sid})
    assert {t["id"] for t in listed["targets"]} == {"taken"} | {f"p{i}" for i in expected_ok}
    assert listed["rev"] == 1 + len(expected_ok)
    added = client.call("events.list", {"topic_prefix": f"target.{sid}", "limit": 1000})
    assert len(added["events"]) == 1 + len(expected_ok)
    revs = [e["payload"]["rev"] for e in added["events"]]
    assert revs == list(range(1, len(revs) + 1))
