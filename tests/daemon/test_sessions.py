"""Sessions over the API: checkpoints, pause, abort through the driver, the watchdog, retries,
the queue, and resume after a graceful stop."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from daemon.client import ClemdApiError, ClemdClient
from tests.daemon.helpers import Gate, Running, misbehaving_registry

END = {"completed", "aborted", "failed", "paused"}


def _until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll a named condition with a bounded timeout (the status method, never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _device(c: ClemdClient, name: str) -> dict[str, object]:
    return next(d for d in c.call("devices.status")["devices"] if d["name"] == name)


def test_checkpoint_waits_for_the_operator(client: ClemdClient) -> None:
    s = client.create_session("exercise", {"positions": 2, "checkpoint": True}, start=True)
    waiting = client.wait_state(s["id"], {"waiting_operator"} | END, 60)
    assert waiting["state"] == "waiting_operator"
    assert waiting["waiting_key"] == "operator/load-em" and waiting["steps_done"] == 2
    with pytest.raises(ClemdApiError) as info:
        client.call("sessions.confirm", {"session_id": s["id"], "key": "operator/other"})
    assert info.value.code == 409
    with pytest.raises(ClemdApiError) as info:          # resuming does not skip a checkpoint
        client.call("sessions.resume", {"session_id": s["id"]})
    assert info.value.code == 409 and "sessions.confirm" in info.value.message
    client.call("sessions.confirm", {"session_id": s["id"], "key": "operator/load-em"})
    done = client.wait_state(s["id"], END, 60)
    assert done["state"] == "completed" and done["steps_done"] == 5
    assert client.session(s["id"])["confirmations"] == ["operator/load-em"]


def test_pause_lands_at_the_step_boundary(make_service: Callable[..., Running]) -> None:
    gate = Gate()
    c = make_service(registry=misbehaving_registry(gate)).client()
    s = c.create_session("spin", {}, start=True)
    assert gate.entered.wait(10)
    assert c.call("sessions.pause", {"session_id": s["id"]})["state"] == "pausing"
    gate.release.set()
    paused = c.wait_state(s["id"], END, 30)
    assert paused["state"] == "paused" and paused["steps_done"] == 1
    assert c.session(s["id"])["steps"] == ["spin/1"]
    c.call("sessions.resume", {"session_id": s["id"]})
    assert c.wait_state(s["id"], END, 30)["state"] == "completed"


def test_abort_cancels_the_step_in_flight_through_the_driver(
        make_service: Callable[..., Running]) -> None:
    gate = Gate()
    c = make_service(registry=misbehaving_registry(gate)).client()
    s = c.create_session("spin", {}, start=True)
    assert gate.entered.wait(10)
    c.call("sessions.abort", {"session_id": s["id"], "reason": "wrong grid"})
    done = c.wait_state(s["id"], END, 30)      # the gate is never released: only abort ends it
    assert done["state"] == "aborted" and done["message"] == "wrong grid"
    assert c.session(s["id"])["steps"] == []
    assert not gate.release.is_set()
    # the driver's abort was consumed: the next session on the same stage runs normally
    t = c.create_session("exercise", {"positions": 2, "em": False}, start=True)
    assert c.wait_state(t["id"], END, 30)["state"] == "completed"


def test_watchdog_pauses_the_session_and_keeps_serving(
        make_service: Callable[..., Running]) -> None:
    gate = Gate()
    running = make_service(registry=misbehaving_registry(gate),
                           runner={"watchdog_s": 0.3, "abort_grace_s": 0.2,
                                   "retry_backoff_s": 0.0})
    c = running.client()
    s = c.create_session("hang", {}, start=True)
    paused = c.wait_state(s["id"], END, 30)
    assert paused["state"] == "paused" and paused["reason"] == "watchdog"
    assert paused["error"]["type"] == "WatchdogExpired"
    assert "runner.watchdog_s" in paused["error"]["message"]
    assert c.status()["state"] == "serving"
    assert _device(c, "lm")["worker"] == "hung"
    # resuming into a still-hung instrument fails at once instead of queueing behind it
    c.call("sessions.resume", {"session_id": s["id"]})
    again = c.wait_state(s["id"], {"paused"}, 30)
    assert "still stuck" in again["error"]["message"]
    gate.release.set()
    _until(lambda: _device(c, "lm")["worker"] == "idle", 10, "the hung call to return")
    c.call("sessions.resume", {"session_id": s["id"]})
    done = c.wait_state(s["id"], {"completed", "failed", "aborted"}, 30)
    assert done["state"] == "completed" and done["error"] is None
    assert c.session(s["id"])["steps"] == ["hang/1", "hang/2"]


def test_retryable_errors_are_retried_others_pause(make_service: Callable[..., Running]) -> None:
    gate = Gate()
    c = make_service(registry=misbehaving_registry(gate)).client()
    gate.flaky_failures = 2                    # runner.step_retries defaults to 2
    s = c.create_session("flaky", {}, start=True)
    assert c.wait_state(s["id"], END, 30)["state"] == "completed"
    warnings = c.call("events.list", {"topic_prefix": "warning", "session_id": s["id"]})
    assert len(warnings["events"]) == 2
    gate.limit_failures = 1                    # not retryable: pause with the error at once
    t = c.create_session("flaky", {}, start=True)
    paused = c.wait_state(t["id"], END, 30)
    assert paused["state"] == "paused" and paused["reason"] == "step_error"
    assert paused["error"]["type"] == "LimitViolation" and paused["error"]["step"] == "flaky/1"
    c.call("sessions.resume", {"session_id": t["id"]})
    assert c.wait_state(t["id"], END, 30)["state"] == "completed"


def test_queue_order_reorder_cancel(make_service: Callable[..., Running]) -> None:
    gate = Gate()
    c = make_service(registry=misbehaving_registry(gate)).client()
    a = c.call("jobs.enqueue", {"template": "spin"})
    assert gate.entered.wait(10) and c.session(a["id"])["session"]["state"] == "running"
    b = c.call("jobs.enqueue", {"template": "exercise", "params": {"positions": 1, "em": False}})
    d = c.call("jobs.enqueue", {"template": "exercise", "params": {"positions": 1, "em": False}})
    e = c.call("jobs.enqueue", {"template": "exercise", "params": {"positions": 1, "lm": False}})
    assert (b["state"], d["state"]) == ("queued", "queued")
    # an EM-only session does not wait behind LM sessions
    assert c.wait_state(e["id"], END, 30)["state"] == "completed"
    order = c.call("jobs.list")
    assert [x["id"] for x in order["sessions"]] == [b["id"], d["id"]]
    moved = c.call("jobs.reorder", {"session_id": d["id"], "position": 0})
    assert [x["id"] for x in moved["sessions"]] == [d["id"], b["id"]]
    assert moved["token"] != order["token"]
    assert c.call("jobs.cancel", {"session_id": b["id"]})["state"] == "created"
    with pytest.raises(ClemdApiError) as info:
        c.call("jobs.cancel", {"session_id": a["id"]})
    assert info.value.code == 409
    gate.release.set()
    assert c.wait_state(a["id"], END, 30)["state"] == "completed"
    assert c.wait_state(d["id"], END, 30)["state"] == "completed"
    assert c.session(b["id"])["session"]["state"] == "created"
    assert c.call("jobs.list")["sessions"] == []


@pytest.mark.parametrize("on_restart", ["resume", "wait"])
def test_graceful_stop_then_restart_resumes(make_service: Callable[..., Running],
                                            tmp_path: object, on_restart: str) -> None:
    first = make_service(runner={"on_restart": on_restart, "retry_backoff_s": 0.0})
    c = first.client()
    s = c.create_session("exercise", {"positions": 150, "em": False}, start=True)
    stream = c.subscribe([f"progress.{s['id']}"])
    try:
        assert stream.next(30) is not None    # at least one step done
    finally:
        stream.close()
    first.stop()                              # halts at a step boundary
    second = make_service(data_dir=first.cfg.data_dir,
                          runner={"on_restart": on_restart, "retry_backoff_s": 0.0})
    c2 = second.client()
    info = c2.session(s["id"])["session"]
    if on_restart == "wait":
        assert c2.wait_state(s["id"], END | {"interrupted"}, 30)["state"] == "interrupted"
        c2.call("sessions.resume", {"session_id": s["id"]})
    else:
        assert info["state"] in {"running", "completed"}
    done = c2.wait_state(s["id"], END, 60)
    assert done["state"] == "completed"
    detail = c2.session(s["id"])
    assert detail["steps"] == [f"lm/pos-{i:03d}" for i in range(150)]
    assert len(detail["artifacts"]) == 150
    states = [e["payload"]["state"] for e in c2.call(
        "events.list", {"topic_prefix": "state", "session_id": s["id"]})["events"]]
    assert "interrupted" in states


@pytest.mark.parametrize("crashed_in,after", [("running", "completed"), ("pausing", "paused"),
                                              ("aborting", "aborted")])
def test_restart_after_a_crash_in_each_executing_state(make_service: Callable[..., Running],
                                                       crashed_in: str, after: str) -> None:
    import sqlite3
    first = make_service()
    c = first.client()
    s = c.create_session("exercise", {"positions": 3, "em": False}, start=True)
    c.wait_state(s["id"], {"completed"}, 60)
    first.stop()
    # what a kill -9 in that state leaves behind: the state, and the last step uncommitted
    conn = sqlite3.connect(first.cfg.data_dir / "journal.sqlite")
    with conn:
        conn.execute("DELETE FROM artifacts WHERE step_key = 'lm/pos-002'")
        conn.execute("DELETE FROM steps WHERE key = 'lm/pos-002'")
        conn.execute("UPDATE sessions SET state = ?, steps_done = 2, current_step = "
                     "'lm/pos-002' WHERE id = ?", (crashed_in, s["id"]))
    conn.close()
    second = make_service(data_dir=first.cfg.data_dir)
    c2 = second.client()
    done = c2.wait_state(s["id"], {"completed", "paused", "aborted"}, 60)
    assert done["state"] == after and done["reason"] in ("service_restart", "plan_finished")
    steps = c2.session(s["id"])["steps"]
    expected = ["lm/pos-000", "lm/pos-001"] + (["lm/pos-002"] if after == "completed" else [])
    assert steps == expected


def test_simulated_time_continues_across_a_restart(make_service: Callable[..., Running]) -> None:
    first = make_service()
    c = first.client()
    s = c.create_session("exercise", {"positions": 2}, start=True)
    c.wait_state(s["id"], {"completed"}, 60)
    last = max(a["meta"]["time_s"] for a in c.session(s["id"])["artifacts"])
    first.stop()
    second = make_service(data_dir=first.cfg.data_dir)
    c2 = second.client()
    t = c2.create_session("exercise", {"positions": 1}, start=True)
    c2.wait_state(t["id"], {"completed"}, 60)
    assert min(a["meta"]["time_s"] for a in c2.session(t["id"])["artifacts"]) > last


def test_a_step_that_keeps_crashing_the_service_is_not_resumed_forever(
        make_service: Callable[..., Running]) -> None:
    import sqlite3
    first = make_service()
    c = first.client()
    s = c.create_session("exercise", {"positions": 3, "em": False}, start=True)
    c.wait_state(s["id"], {"completed"}, 60)
    first.stop()
    data_dir = first.cfg.data_dir

    def crash_in_last_step() -> None:
        """What a kill -9 (an OOM kill, say) inside step lm/pos-002 leaves behind."""
        conn = sqlite3.connect(data_dir / "journal.sqlite")
        with conn:
            conn.execute("DELETE FROM artifacts WHERE step_key = 'lm/pos-002'")
            conn.execute("DELETE FROM steps WHERE key = 'lm/pos-002'")
            conn.execute("UPDATE sessions SET state = 'running', current_step = 'lm/pos-002' "
                         "WHERE id = ?", (s["id"],))
        conn.close()

    for restart in (1, 2, 3):
        crash_in_last_step()
        running = make_service(data_dir=data_dir, runner={"max_auto_resumes": 3})
        c2 = running.client()
        info = c2.wait_state(s["id"], {"completed", "interrupted"}, 60)
        if restart < 3:
            assert info["state"] == "completed"
        else:
            assert info["state"] == "interrupted"
            warning = c2.call("events.list", {"topic_prefix": f"warning.{s['id']}"})["events"]
            assert "3 consecutive restarts" in warning[-1]["payload"]["message"]
            c2.call("sessions.resume", {"session_id": s["id"]})
            assert c2.wait_state(s["id"], {"completed"}, 60)["state"] == "completed"
        running.stop()
