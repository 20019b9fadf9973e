"""Driver speed benchmarks; prints one JSON object with a section per driver.

Section "micromanager": frames per second of a 100-frame acquisition streamed through
``MicroManagerLightMicroscope.run_events`` versus the same acquisition with pycromanager's
``Acquisition`` alone, on Micro-Manager's demo camera in an in-process MMCore. Both get the
same events (same preset, same exposure, one time point each, no waits), both receive every
frame in Python through an ``image_process_fn`` (the driver's own path), and both are timed
from creating the acquisition to having the last frame and pycromanager finished. Runs
alternate so drift hits both alike; the median of the repeats is reported. Target:
driver / pycromanager >= 0.9.

Section "serialem": the SerialEM client (drivers/serialem/client.py) over loopback TCP to the
SerialEM twin (simulators/serialem_server.py): round-trip latency of a status call
(ReportStageXYZ; median and p99 of N calls after a warm-up), and the throughput of fetching
a 4096 x 4096 int16 image from a buffer (get, as the driver does after each shot; and put),
median of R transfers, MB = 10^6 bytes.

Usage: ``python benchmarks/drivers.py [--sections micromanager serialem] [--frames N]
[--repeats R] [--exposure-ms MS ...] [--status-calls N] [--image-repeats R]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.clock import RealClock
from drivers.micromanager import MicroManagerLightMicroscope
from drivers.micromanager_config import demo_config
from drivers.micromanager_core import MMConnection

TARGET_RATIO = 0.9
CHANNEL = "DIC"


def _pycromanager_alone(connection: MMConnection, frames: int, exposure_ms: float) -> float:
    """Seconds for ``frames`` frames through a bare pycromanager Acquisition."""
    from pycromanager import Acquisition

    group, preset = "LightPath", "Camera-left"  # demo_config's DIC preset
    events = [{"axes": {"time": i}, "config_group": [group, preset], "exposure": exposure_ms}
              for i in range(frames)]
    received: list[Any] = []

    def keep(image: Any, metadata: dict[str, Any]) -> None:
        received.append((image, metadata))

    with connection.lock:
        start = time.perf_counter()
        with Acquisition(image_process_fn=keep) as acq:
            acq.acquire(events)
        elapsed = time.perf_counter() - start
    if len(received) != frames:
        raise RuntimeError(f"pycromanager delivered {len(received)} of {frames} frames")
    return elapsed


def _through_driver(light: MicroManagerLightMicroscope, frames: int, exposure_ms: float) -> float:
    """Seconds for ``frames`` frames streamed through the driver."""
    import useq

    seq = useq.MDASequence.model_validate({
        "channels": [{"config": CHANNEL, "exposure": exposure_ms}],
        "time_plan": {"interval": 0, "loops": frames}})
    events = list(seq)  # planning the sequence is not the driver's cost
    start = time.perf_counter()
    count = sum(1 for _ in light.run_events(events))
    elapsed = time.perf_counter() - start
    if count != frames:
        raise RuntimeError(f"driver delivered {count} of {frames} frames")
    return elapsed


def _case(light: MicroManagerLightMicroscope, connection: MMConnection, frames: int,
          repeats: int, exposure_ms: float) -> dict[str, Any]:
    runs: dict[str, list[float]] = {"driver": [], "pycromanager": []}
    timed: dict[str, Callable[[], float]] = {
        "driver": lambda: _through_driver(light, frames, exposure_ms),
        "pycromanager": lambda: _pycromanager_alone(connection, frames, exposure_ms),
    }
    for run in timed.values():  # warm-up: first acquisitions pay for thread and buffer setup
        run()
    for _ in range(repeats):
        for name, run in timed.items():
            runs[name].append(frames / run())
    driver_fps = statistics.median(runs["driver"])
    alone_fps = statistics.median(runs["pycromanager"])
    return {
        "exposure_ms": exposure_ms,
        "driver_fps": round(driver_fps, 2),
        "pycromanager_fps": round(alone_fps, 2),
        "ratio": round(driver_fps / alone_fps, 3),
        "meets_target": driver_fps / alone_fps >= TARGET_RATIO,
        "driver_fps_runs": [round(v, 2) for v in runs["driver"]],
        "pycromanager_fps_runs": [round(v, 2) for v in runs["pycromanager"]],
    }


def bench_micromanager(frames: int, repeats: int, exposures_ms: list[float]) -> dict[str, Any]:
    """The micromanager section: one case per exposure, on one in-process demo core."""
    config = demo_config()
    with MMConnection.open(config.connection) as connection:
        light = MicroManagerLightMicroscope(config, connection, RealClock())
        try:
            shape = light.camera_shape()
            cases = [_case(light, connection, frames, repeats, e) for e in exposures_ms]
            pixel_type = f"uint{8 * int(connection.core.get_bytes_per_pixel())}"
        finally:
            light.close()
    return {
        "what": f"{frames}-frame acquisition, demo camera, in-process MMCore: "
                "MicroManagerLightMicroscope.run_events vs pycromanager Acquisition alone",
        "frames": frames,
        "repeats": repeats,
        "statistic": "median fps over repeats, runs alternating",
        "camera": {"shape": list(shape), "pixel_type": pixel_type},
        "target_ratio": TARGET_RATIO,
        "cases": cases,
    }


def _serialem_latency_us(client: Any, calls: int) -> list[float]:
    """Microseconds of each of ``calls`` ReportStageXYZ round trips."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        client.call("ReportStageXYZ")
        out.append((time.perf_counter() - start) * 1e6)
    return out


def bench_serialem(status_calls: int, image_repeats: int) -> dict[str, Any]:
    """The serialem section: client <-> twin on loopback, one connection, TCP_NODELAY."""
    import numpy as np

    from drivers.serialem.client import SerialEMClient
    from simulators.serialem_server import build_twin

    image = np.random.default_rng(0).integers(-2000, 2000, (4096, 4096), dtype=np.int16)
    megabytes = image.nbytes / 1e6
    with build_twin(camera=512, port=0) as twin:
        client = SerialEMClient(*twin.address)
        try:
            _serialem_latency_us(client, 100)            # connect, control, warm caches
            latencies = sorted(_serialem_latency_us(client, status_calls))
            puts, gets = [], []
            for _ in range(image_repeats):
                start = time.perf_counter()
                client.put_image(image, "B")
                puts.append(megabytes / (time.perf_counter() - start))
                start = time.perf_counter()
                back = client.get_image("B")
                gets.append(megabytes / (time.perf_counter() - start))
            if not np.array_equal(back, image):
                raise RuntimeError("the image came back different")
        finally:
            client.close()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {
        "what": "SerialEMClient over loopback TCP to simulators/serialem_server.py",
        "host": {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)},
        "status_call": {
            "command": "ReportStageXYZ", "calls": status_calls,
            "median_us": round(statistics.median(latencies), 1), "p99_us": round(p99, 1),
            "max_us": round(latencies[-1], 1),
        },
        "image_transfer": {
            "shape": list(image.shape), "dtype": "int16", "megabytes": round(megabytes, 2),
            "repeats": image_repeats,
            "get_mb_per_s": round(statistics.median(gets), 1),
            "put_mb_per_s": round(statistics.median(puts), 1),
            "get_mb_per_s_runs": [round(v, 1) for v in gets],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exposure-ms", type=float, nargs="+", default=[10.0, 1.0])
    parser.add_argument("--sections", nargs="+", choices=["micromanager", "serialem"],
                        default=["micromanager", "serialem"])
    parser.add_argument("--status-calls", type=int, default=1000)
    parser.add_argument("--image-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    # The JSON object is the only thing on stdout.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    result: dict[str, Any] = {}
    if "micromanager" in args.sections:
        result["micromanager"] = bench_micromanager(args.frames, args.repeats, args.exposure_ms)
    if "serialem" in args.sections:
        result["serialem"] = bench_serialem(args.status_calls, args.image_repeats)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
