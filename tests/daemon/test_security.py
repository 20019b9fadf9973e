"""CurveZMQ: allowlisted keys with roles; observers read only; unknown keys are refused with a
structured 401 (requests) or at the handshake (events); the service keeps serving others."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.client import ClemdApiError, ClientTimeout, CurveClientKeys
from tests.daemon.helpers import Running, journal_snapshot


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    assert main(["keys", "--dir", str(folder), "server", "alice", "bob", "mallory"]) == 0
    return folder


@pytest.fixture
def curve_service(make_service: Callable[..., Running], keys: Path) -> Running:
    return make_service(security={
        "curve": True, "server_secret_key_file": str(keys / "server.key_secret"),
        "clients": [{"name": "alice", "public_key_file": str(keys / "alice.key"),
                     "role": "operator"},
                    {"name": "bob", "public_key_file": str(keys / "bob.key"),
                     "role": "observer"}]})


def _keys(folder: Path, name: str) -> CurveClientKeys:
    return CurveClientKeys(folder / f"{name}.key_secret", folder / "server.key")


def test_keys_command_writes_a_private_secret(keys: Path) -> None:
    assert (keys / "alice.key").is_file()
    mode = stat.S_IMODE((keys / "alice.key_secret").stat().st_mode)
    assert mode == 0o600


def test_operator_may_change_things(curve_service: Running, keys: Path) -> None:
    alice = curve_service.client(_keys(keys, "alice"))
    assert alice.status()["role"] == "operator"
    s = alice.create_session("exercise", {"positions": 1}, start=True)
    assert alice.wait_state(s["id"], {"completed"}, 60)["state"] == "completed"


MUTATING = [("sessions.create", {"template": "exercise"}), ("shutdown", {}),
            ("jobs.enqueue", {"template": "exercise"}),
            ("targets.submit", {"session_id": "SID", "targets": [
                {"frame": "lm_stage", "x": 0, "y": 0}]}),
            ("sessions.abort", {"session_id": "SID"})]


@pytest.mark.parametrize("method,params", MUTATING, ids=[m for m, _ in MUTATING])
def test_observer_is_refused_on_mutating_calls(curve_service: Running, keys: Path,
                                               method: str, params: dict[str, object]) -> None:
    alice = curve_service.client(_keys(keys, "alice"))
    bob = curve_service.client(_keys(keys, "bob"))
    sid = alice.create_session("exercise", {"positions": 1})["id"]
    params = {k: (sid if v == "SID" else v) for k, v in params.items()}
    before = journal_snapshot(curve_service.cfg.data_dir)
    with pytest.raises(ClemdApiError) as info:
        bob.call(method, params)
    assert (info.value.code, info.value.type) == (403, "forbidden")
    assert "observer" in info.value.message
    assert journal_snapshot(curve_service.cfg.data_dir) == before
    # reading is allowed
    assert bob.status()["role"] == "observer"
    assert bob.session(sid)["session"]["id"] == sid


def test_unknown_key_gets_401_and_others_are_served(curve_service: Running, keys: Path) -> None:
    mallory = curve_service.client(_keys(keys, "mallory"))
    alice = curve_service.client(_keys(keys, "alice"))
    before = journal_snapshot(curve_service.cfg.data_dir)
    for method, params in [("status", {}), ("sessions.create", {"template": "exercise"})]:
        with pytest.raises(ClemdApiError) as info:
            mallory.call(method, params)
        assert (info.value.code, info.value.type) == (401, "unauthorised")
        assert alice.status()["state"] == "serving"
    assert journal_snapshot(curve_service.cfg.data_dir) == before


def test_unknown_key_cannot_subscribe(curve_service: Running, keys: Path) -> None:
    mallory = curve_service.client(_keys(keys, "mallory"))
    alice = curve_service.client(_keys(keys, "alice"))
    spy = mallory.subscribe([""])
    watcher = alice.subscribe([""])
    try:
        # keep producing events until alice's subscription is connected and sees one
        for _ in range(50):
            alice.create_session("exercise", {"positions": 1})
            if watcher.next(0.1) is not None:
                break
        else:
            pytest.fail("the operator's subscription never received an event")
        alice.create_session("exercise", {"positions": 1})
        assert watcher.next(2.0) is not None
        assert spy.next(0.5) is None
    finally:
        spy.close()
        watcher.close()


def test_plain_client_gets_nothing_from_a_curve_service(curve_service: Running) -> None:
    plain = curve_service.client(timeout_s=0.5)
    with pytest.raises(ClientTimeout):
        plain.status()
