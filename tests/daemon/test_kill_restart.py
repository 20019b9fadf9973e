"""kill -9 at random points of a simulated session, then restart: the session completes, no
acquisition is lost or repeated, and every acknowledged target is still there.

The service runs as a real subprocess (``python -m daemon.cli serve``). Kill points are drawn
from a seeded RNG: after 1-4 more finished steps plus 0-40 ms (so kills land inside steps,
between a file write and its commit, and during target submissions). Waiting is on events and
the status method with bounded timeouts, never on simulated hardware time.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.client import ClemdApiError, ClemdClient, EventStream
from daemon.service_process import ServiceProcess
from tests.daemon.helpers import free_ports

REPO = Path(__file__).resolve().parents[2]
POSITIONS = 30
KILLS = 12
# With no event for this long the session's status is asked directly. After a restart the
# subscription takes a moment to reconnect, and the resumed service may finish the
# remaining virtual-clock steps in well under half a second: polling every 0.5 s, all
# later kills then found it completed (1 run in 3: [39, 43, 71, 102, 102, ...]).
STATUS_POLL_S = 0.02


def write_config(folder: Path) -> Path:
    data = folder / "data"
    cfg = folder / "clemd.toml"
    bind_port, events_port = free_ports(2)
    cfg.write_text(f"""
data_dir = "{data}"
log_level = "info"

[api]
bind = "tcp://127.0.0.1:{bind_port}"
events = "tcp://127.0.0.1:{events_port}"

[runner]
on_restart = "resume"

[lm]
kind = "simulated"
settings = {{ camera = {{ shape = [64, 64] }} }}

[em]
kind = "simulated"
settings = {{ camera_shape = [128, 128] }}
""", encoding="utf-8")
    return cfg


class TargetFeeder:
    """Submits one target per request until stopped; remembers what was acknowledged."""

    def __init__(self, address: str, events: str, session_id: str,
                 acked: dict[str, dict[str, Any]], start: int) -> None:
        self.address, self.events, self.sid = address, events, session_id
        self.acked = acked
        self.n = start
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with ClemdClient(self.address, self.events, timeout_s=1.0) as c:
            while not self.stop.is_set():
                t: dict[str, Any] = {"id": f"k{self.n:04d}", "frame": "em_stage",
                     "x": float(self.n % 40) - 20.0, "y": float(self.n % 7), "label": "feeder"}
                try:
                    c.submit_targets(self.sid, [t])
                except ClemdApiError:
                    return                      # service gone: this one was not acknowledged
                self.acked[t["id"]] = t
                self.n += 1

    def join(self) -> int:
        self.stop.set()
        self.thread.join(10)
        return self.n


def _wait_progress(client: ClemdClient, stream: EventStream, sid: str, more: int,
                   timeout_s: float) -> int:
    """Wait until the session has ``more`` steps done beyond what it had on entry (or ended).

    ``stream`` stays subscribed across kills (a SUB socket reconnects by itself), so the
    steps a restarted service runs while this test reads the session are not missed; events
    older than the entry count are ignored by their ``done`` figure."""
    info = client.session(sid)["session"]
    goal = info["steps_done"] + more
    deadline = time.monotonic() + timeout_s
    while info["state"] not in ("completed", "failed", "aborted"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no progress in session {sid}: {info}")
        ev = stream.next(min(remaining, STATUS_POLL_S))
        if ev is not None and ev["kind"] == "progress" and ev["payload"]["done"] >= goal:
            return int(ev["payload"]["done"])
        if ev is None or ev["kind"] == "state":
            info = client.session(sid)["session"]
            if info["steps_done"] >= goal:
                return int(info["steps_done"])
    return int(info["steps_done"])


@pytest.mark.slow
def test_kill9_at_random_points_then_restart(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    import tomllib
    api = tomllib.loads(config.read_text())["api"]
    proc = ServiceProcess(config, tmp_path / "clemd.log", cwd=REPO)
    rng = random.Random(20240611)
    acked: dict[str, dict[str, Any]] = {}
    done_at_kill: list[int] = []
    next_target = 0
    with ClemdClient(api["bind"], api["events"], timeout_s=5.0) as client:
        try:
            proc.start(client)
            sid = client.create_session("exercise", {"positions": POSITIONS,
                                                     "visit_targets": True})["id"]
            stream = client.subscribe([f"progress.{sid}", f"state.{sid}"])
            client.call("sessions.start", {"session_id": sid})
            for _ in range(KILLS):
                feeder = TargetFeeder(api["bind"], api["events"], sid, acked, next_target)
                _wait_progress(client, stream, sid, rng.randint(1, 4), 60)
                time.sleep(rng.uniform(0.0, 0.04))   # land inside a step, not only after one
                proc.kill()
                next_target = feeder.join()
                proc.start(client)
                done_at_kill.append(client.session(sid)["session"]["steps_done"])
            final = client.wait_state(sid, {"completed", "failed", "aborted", "paused"}, 120)
            detail = client.session(sid)
            targets = client.call("targets.list", {"session_id": sid})["targets"]
            stream.close()
        finally:
            proc.stop()

    assert final["state"] == "completed", final
    assert len(done_at_kill) == KILLS
    assert len(set(done_at_kill)) >= KILLS // 2, f"kills did not spread: {done_at_kill}"
    assert min(done_at_kill) < 2 * POSITIONS, "every kill came after the acquisitions"

    # every acknowledged target is there, unchanged
    by_id = {t["id"]: t for t in targets}
    assert acked, "no target was acknowledged"
    for tid, t in acked.items():
        assert tid in by_id, f"acknowledged target {tid} lost"
        got = by_id[tid]
        assert (got["frame"], got["x"], got["y"], got["label"]) == (
            t["frame"], t["x"], t["y"], t["label"])

    # every planned acquisition exactly once, in plan order
    snapshot_ids = [t["id"] for t in _snapshot(tmp_path, sid)]
    expected = ([f"lm/pos-{i:03d}" for i in range(POSITIONS)] +
                [f"em/pos-{i:03d}" for i in range(POSITIONS)] + ["targets/snapshot"] +
                [f"em/target-{t}" for t in snapshot_ids])
    assert detail["steps"] == expected
    artifacts = detail["artifacts"]
    paths = [a["path"] for a in artifacts]
    assert len(paths) == len(set(paths)) == 2 * POSITIONS + len(snapshot_ids)
    assert sorted(a["step_key"] for a in artifacts) == sorted(
        k for k in expected if k != "targets/snapshot")
    folder = Path(final["data_dir"])
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert on_disk == sorted(paths), "stray or missing files in the session folder"
    for a in artifacts:
        f = folder / a["path"]
        assert f.stat().st_size == a["size_bytes"]
        img = np.load(f)
        assert img.ndim == 2 and img.size > 0
        if a["step_key"].startswith(("lm/pos-", "em/pos-")):
            i = int(a["step_key"].rsplit("-", 1)[1])
            assert a["meta"]["stage_um"][:2] == pytest.approx(_position(i), abs=1e-9)


def _position(i: int) -> list[float]:
    from daemon.exercise import ExerciseParams, positions
    return list(positions(ExerciseParams(positions=POSITIONS))[i])


def _snapshot(tmp_path: Path, sid: str) -> list[dict[str, Any]]:
    import json
    import sqlite3
    conn = sqlite3.connect(f"file:{tmp_path / 'data' / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT result FROM steps WHERE session_id = ? AND key = ?",
                           (sid, "targets/snapshot")).fetchone()
    finally:
        conn.close()
    targets: list[dict[str, Any]] = json.loads(row[0])["targets"]
    return targets
