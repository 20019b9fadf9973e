"""``runner.auto_confirm_checkpoints``: with simulated instruments a session passes its
operator checkpoint by itself, and the journal says the config confirmed it."""

from __future__ import annotations

from collections.abc import Callable

from tests.daemon.helpers import Running

END = {"completed", "aborted", "failed", "paused"}


def test_checkpoint_is_confirmed_by_config(make_service: Callable[..., Running]) -> None:
    c = make_service(runner={"auto_confirm_checkpoints": True}).client()
    s = c.create_session("exercise", {"positions": 2, "checkpoint": True}, start=True)
    done = c.wait_state(s["id"], END, 60)
    assert done["state"] == "completed" and done["steps_done"] == 5
    info = c.session(s["id"])
    assert info["confirmations"] == ["operator/load-em"]
    events = c.call("events.list", {"session_id": s["id"]})["events"]
    states = [e["payload"] for e in events if e["kind"] == "state"]
    assert [e["state"] for e in states].count("waiting_operator") == 1
    confirmed = [e for e in states if e["reason"] == "confirmed"]
    assert len(confirmed) == 1 and "by config" in confirmed[0]["message"]
    notes = [e["payload"] for e in events if e["kind"] == "warning"]
    assert any(n.get("confirmed_by") == "config" for n in notes)


def test_without_it_the_checkpoint_waits(make_service: Callable[..., Running]) -> None:
    c = make_service().client()
    s = c.create_session("exercise", {"positions": 1, "checkpoint": True}, start=True)
    assert c.wait_state(s["id"], {"waiting_operator"} | END, 60)["state"] == "waiting_operator"
