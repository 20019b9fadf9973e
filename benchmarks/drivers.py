"""Driver speed benchmarks; prints one JSON object with a section per driver.

Section "micromanager": frames per second of a 100-frame acquisition streamed through
``MicroManagerLightMicroscope.run_events`` versus the same acquisition with pycromanager's
``Acquisition`` alone, on Micro-Manager's demo camera in an in-process MMCore. Both get the
same events (same preset, same exposure, one time point each, no waits), both receive every
frame in Python through an ``image_process_fn`` (the driver's own path), and both are timed
from creating the acquisition to having the last frame and pycromanager finished. Runs
alternate so drift hits both alike; the median of the repeats is reported. Target:
driver / pycromanager >= 0.9.

Usage: ``python benchmarks/drivers.py [--frames N] [--repeats R] [--exposure-ms MS ...]``
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--exposure-ms", type=float, nargs="+", default=[10.0, 1.0])
    args = parser.parse_args(argv)
    # The JSON object is the only thing on stdout.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    result = {"micromanager": bench_micromanager(args.frames, args.repeats, args.exposure_ms)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
