"""The service on the real SerialEM driver, over TCP to the simulated SerialEM twin: the
same session the simulated EM runs, through drivers/serialem and simulators/serialem_server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.daemon.helpers import Running

serialem_server = pytest.importorskip("simulators.serialem_server")


@pytest.fixture
def twin() -> Iterator[tuple[str, int]]:
    server = serialem_server.build_twin(seed=3, camera=128, port=0)
    with server:
        yield server.address


def _settings(host: str, port: int) -> dict[str, object]:
    from simulators.electron_config import default_low_dose, default_magnifications
    mags = [{"index": m.index, "magnification": m.magnification,
             "pixel_size_um": m.pixel_size_um, "rotation_deg": m.rotation_deg}
            for m in default_magnifications()]
    view = default_low_dose()["view"]
    return {"host": host, "port": port, "magnifications": mags, "camera_shape": [128, 128],
            "low_dose": {"view": {"mag_index": view.mag_index, "exposure_s": view.exposure_s,
                                  "binning": view.binning}}}


def test_exercise_session_through_the_serialem_driver(make_service: Callable[..., Running],
                                                      twin: tuple[str, int]) -> None:
    running = make_service(em={"kind": "serialem", "settings": _settings(*twin)})
    c = running.client()
    assert c.status()["clock"] == "real"
    assert {d["name"]: d["kind"] for d in c.status()["devices"]}["em"] == "serialem"
    s = c.create_session("exercise", {"positions": 2, "lm": False, "spacing_um": 20},
                         start=True)
    done = c.wait_state(s["id"], {"completed", "paused", "failed", "aborted"}, 120)
    assert done["state"] == "completed", done
    arts = c.session(s["id"])["artifacts"]
    assert [a["path"] for a in arts] == ["em/pos-000.npy", "em/pos-001.npy"]
    assert all(a["meta"]["instrument"] == "em" for a in arts)


def test_serialem_not_running_pauses_the_session_with_a_clear_error(
        make_service: Callable[..., Running]) -> None:
    from tests.daemon.helpers import free_port
    running = make_service(em={"kind": "serialem", "settings": _settings("127.0.0.1",
                                                                         free_port())},
                           runner={"step_retries": 1, "retry_backoff_s": 0.01})
    c = running.client()
    s = c.create_session("exercise", {"positions": 1, "lm": False}, start=True)
    done = c.wait_state(s["id"], {"completed", "paused", "failed", "aborted"}, 120)
    assert done["state"] == "paused" and done["reason"] == "step_error"
    assert done["error"]["type"] == "ConnectionLost" and done["error"]["retryable"]
    warnings = c.call("events.list", {"topic_prefix": "warning", "session_id": s["id"]})
    assert any("retrying step em/pos-000" in e["payload"]["message"]
               for e in warnings["events"])
