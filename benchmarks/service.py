"""Service benchmark: request latency, target throughput, resume time after kill -9.

Runs ``clemd serve`` as a subprocess on loopback with simulated instruments and prints one
JSON object:

- ``latency_ms``: the ``status`` method and a one-target ``targets.submit`` (a journal
  commit with fsync), median and p99, with 1 client and with 50 concurrent clients
  (asyncio DEALER sockets in one process);
- ``targets``: 10,000 targets submitted one per request by 50 concurrent clients, and in
  batches of 100, accepted per second, and how many of the acknowledged ones are missing
  from ``targets.list`` afterwards (must be 0);
- ``resume_s``: after kill -9 in the middle of a session, seconds from the new process's
  start until it answers ``status``, until the session runs again, and until its next step
  is committed (median of ``--kills`` runs).

    python benchmarks/service.py [--requests 2000] [--kills 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.client import ClemdClient
from daemon.ports import free_ports
from daemon.service_process import ServiceProcess


class Service(ServiceProcess):
    """The service in its own process on two free loopback ports, small simulated cameras."""

    def __init__(self, folder: Path) -> None:
        bind_port, events_port = free_ports(2)
        self.bind = f"tcp://127.0.0.1:{bind_port}"
        self.events = f"tcp://127.0.0.1:{events_port}"
        config = folder / "clemd.toml"
        config.write_text(f"""
data_dir = "{folder / 'data'}"
log_level = "warning"
[api]
bind = "{self.bind}"
events = "{self.events}"
[lm]
kind = "simulated"
settings = {{ camera = {{ shape = [64, 64] }} }}
[em]
kind = "simulated"
settings = {{ camera_shape = [128, 128] }}
""", encoding="utf-8")
        super().__init__(config, folder / "clemd.log", cwd=REPO)


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median": round(statistics.median(s) * 1000, 3),
            "p99": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1000, 3), "n": len(s)}


async def _client(ctx: zmq.asyncio.Context, address: str, bodies: list[bytes],
                  out: list[float]) -> list[dict[str, Any]]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    replies = []
    try:
        for body in bodies:
            t0 = time.perf_counter()
            await sock.send(body)
            reply = json.loads(await sock.recv())
            out.append(time.perf_counter() - t0)
            replies.append(reply)
    finally:
        sock.close()
    return replies


def _run_clients(address: str, per_client: list[list[bytes]]) -> tuple[list[float], float,
                                                                       list[dict[str, Any]]]:
    async def main() -> tuple[list[float], float, list[dict[str, Any]]]:
        ctx = zmq.asyncio.Context()
        times: list[float] = []
        try:
            t0 = time.perf_counter()
            results = await asyncio.gather(*[_client(ctx, address, b, times)
                                             for b in per_client])
            wall = time.perf_counter() - t0
        finally:
            ctx.term()
        return times, wall, [r for rs in results for r in rs]
    return asyncio.run(main())


def _req(method: str, params: dict[str, Any], rid: str) -> bytes:
    return json.dumps({"schema": 1, "id": rid, "method": method, "params": params}).encode()


def latency(svc: Service, sid: str, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for clients in (1, 50):
        n = max(1, requests // clients)
        status = [[_req("status", {}, f"s{c}-{i}") for i in range(n)] for c in range(clients)]
        times, _, _ = _run_clients(svc.bind, status)
        out[f"status_{clients}_clients"] = _stats(times)
        submit = [[_req("targets.submit", {"session_id": sid, "targets": [
            {"id": f"lat{clients}-{c}-{i}", "frame": "lm_stage", "x": 1.0, "y": 2.0}]},
            f"t{c}-{i}") for i in range(n)] for c in range(clients)]
        times, _, replies = _run_clients(svc.bind, submit)
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:1]
        out[f"submit_target_{clients}_clients"] = _stats(times)
    return out


def throughput(svc: Service, client: ClemdClient, total: int = 10_000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, per_request in (("one_per_request_50_clients", 1), ("batches_of_100", 100)):
        sid = client.create_session("exercise", {"positions": 1})["id"]
        clients = 50 if per_request == 1 else 1
        bodies: list[list[bytes]] = [[] for _ in range(clients)]
        for k, start in enumerate(range(0, total, per_request)):
            targets = [{"id": f"x{j}", "frame": "lm_stage", "x": float(j % 1000), "y": 0.0}
                       for j in range(start, min(total, start + per_request))]
            bodies[k % clients].append(_req("targets.submit", {"session_id": sid,
                                                               "targets": targets}, f"b{k}"))
        _, wall, replies = _run_clients(svc.bind, bodies)
        acked = {t["id"] for r in replies if r["ok"] for t in r["result"]["targets"]}
        listed = {t["id"] for t in client.call("targets.list", {"session_id": sid},
                                               timeout_s=60)["targets"]}
        out[mode] = {"submitted": total, "acknowledged": len(acked),
                     "lost": len(acked - listed), "per_s": round(total / wall, 1),
                     "wall_s": round(wall, 3)}
    return out


def resume(folder: Path, kills: int) -> dict[str, Any]:
    svc = Service(folder)
    answer, running, next_step = [], [], []
    with ClemdClient(svc.bind, svc.events, timeout_s=10) as client:
        try:
            svc.start(client)
            sid = client.create_session("exercise", {"positions": 400}, start=True)["id"]
            for _ in range(kills):
                stream = client.subscribe([f"progress.{sid}"])
                stream.next(30)
                stream.next(30)
                stream.close()
                svc.kill()
                t0 = time.monotonic()
                svc.start(client)
                answer.append(time.monotonic() - t0)
                stream = client.subscribe([f"progress.{sid}"])
                while client.session(sid)["session"]["state"] != "running":
                    time.sleep(0.001)
                running.append(time.monotonic() - t0)
                stream.next(30)
                next_step.append(time.monotonic() - t0)
                stream.close()
            client.call("sessions.abort", {"session_id": sid})
        finally:
            svc.stop()
    med = statistics.median
    return {"kills": kills, "to_status_s": round(med(answer), 3),
            "to_running_s": round(med(running), 3), "to_next_step_s": round(med(next_step), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--kills", type=int, default=3)
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a").mkdir()
        svc = Service(Path(tmp) / "a")
        with ClemdClient(svc.bind, svc.events, timeout_s=30) as client:
            try:
                start_s = svc.start(client)
                sid = client.create_session("exercise", {"positions": 1})["id"]
                lat = latency(svc, sid, ns.requests)
                thr = throughput(svc, client)
            finally:
                svc.stop()
        (Path(tmp) / "b").mkdir()
        res = resume(Path(tmp) / "b", ns.kills)
    print(json.dumps({"benchmark": "service", "python": platform.python_version(),
                      "cpus": os.cpu_count(), "startup_s": round(start_s, 3),
                      "latency_ms": lat, "targets": thr, "resume_s": res}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
