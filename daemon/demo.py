"""``make demo``: a whole AutoCLEM session on the simulated instruments, through the service.

What a facility sees first: the service starts (a separate process, simulated instruments,
loopback only, data in ``demo-output/`` by default, emptied first), a client creates an ``autoclem`` session of two
squares and a few targets per square over the ZMQ API, follows it with live progress bars
and waits for the end, prints where the report is and what it says, and stops the service.
The "freeze and load" checkpoint is confirmed by the service's config
(``runner.auto_confirm_checkpoints``: the instruments are simulated, there is nothing to
freeze); the demo only reports it. Exit 0 when the session completed with at least one tilt
series, 1 otherwise.

The simulated instruments keep their real fields of view with small cameras (as the CI
session test, tests/protocols/session_sim.py): a 5x atlas objective, a 100x field binned to
0.1 um pixels, the EM atlas at 62x, square maps at 1,600x, tilt series at 39,000x binned 8
over -6..+6 degrees, so the session takes a few minutes of computing (and a few hours of
modelled instrument time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from daemon.client import ClemdApiError, ClemdClient
from daemon.ports import free_ports
from daemon.service_process import ServiceProcess, ServiceStartFailed
from daemon.watch import watch

__all__ = ["DemoFolderInUse", "demo_config", "demo_params", "fresh_folder", "main", "run_demo"]

LOW_DOSE: dict[str, Any] = {
    "search": {"mag_index": 1, "exposure_s": 0.5, "binning": 8, "dose_rate_e_per_a2_s": 0.002},
    "view": {"mag_index": 12, "exposure_s": 1.0, "binning": 4, "dose_rate_e_per_a2_s": 0.02,
             "defocus_offset_um": -50.0},
    "focus": {"mag_index": 24, "exposure_s": 0.5, "binning": 8, "dose_rate_e_per_a2_s": 2.0,
              "axis_offset_um": 2.0},
    "trial": {"mag_index": 24, "exposure_s": 0.5, "binning": 8, "dose_rate_e_per_a2_s": 0.5,
              "axis_offset_um": 2.0},
    "record": {"mag_index": 24, "exposure_s": 1.2, "binning": 8, "dose_rate_e_per_a2_s": 2.0},
}
LM_SETTINGS: dict[str, Any] = {
    "camera": {"shape": [1024, 1024]},
    "objectives": {"5x": {"magnification": 5, "numerical_aperture": 0.15,
                          "pixel_size_um": 1.3},
                   "100x": {"pixel_size_um": 0.1}},
}
SPECIMEN: dict[str, Any] = {"beads_per_square": [12, 24], "bead_loss": 0.2,
                            "cell_square_fraction": 0.3}


def _toml(value: Any) -> str:
    """A TOML value (inline tables and arrays) for the small config written here."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}"
                                for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def demo_config(data_dir: Path, seed: int) -> tuple[str, str, str]:
    """The service config (TOML text), its request and its event address."""
    bind_port, events_port = free_ports(2)
    bind = f"tcp://127.0.0.1:{bind_port}"
    events = f"tcp://127.0.0.1:{events_port}"
    lines = [
        "# clemd demo: simulated instruments with small cameras, loopback only",
        "schema_version = 1", f"data_dir = {_toml(str(data_dir))}", 'log_level = "info"', "",
        "[api]", f"bind = {_toml(bind)}", f"events = {_toml(events)}", "",
        "[runner]", 'on_restart = "resume"', "watchdog_s = 600", "step_retries = 2",
        "retry_backoff_s = 1", "auto_confirm_checkpoints = true", "",
        "[simulation]", f"seed = {seed}", f"specimen = {_toml(SPECIMEN)}", "",
        "[lm]", 'kind = "simulated"', f"settings = {_toml(LM_SETTINGS)}", "",
        "[em]", 'kind = "simulated"',
        f"settings = {_toml({'camera_shape': [4096, 4096], 'low_dose': LOW_DOSE})}", "",
    ]
    return "\n".join(lines), bind, events


def demo_params(squares: int, targets_per_square: int) -> dict[str, Any]:
    """The session: paper defaults but where the small cameras and a short run need less.

    The LM atlas is centred on the stage origin and 3.4 mm wide, so a grid placed anywhere
    within +-150 um of it is covered, as an operator would place the dish."""
    return {
        "n_squares": squares, "max_targets_per_square": targets_per_square,
        "tilt_scheme": {"kind": "bidirectional", "min_deg": -6, "max_deg": 6, "step_deg": 3},
        "lm_atlas": {"objective": "5x", "overlap": 0.15, "diameter_um": 3400.0},
        "square_selection": {"inspect": 2 * squares + 1,
                             "inspection": {"z_range_um": 2.0, "focus_range_um": 8.0}},
        "live": {"interval_s": 300.0, "duration_s": 600.0, "z_range_um": 2.0},
        "em_atlas": {"grid_radius_um": 1650.0},
        "square_maps": {"tiles_xy": [5, 5]},
        # realign at the square maps' own preset (View) every iteration, as protocols/realign.py
        # recommends: a second look at 4,700x aligned to the 1,600x map cost 100-160 nm
        "tilt_series": {"track_settings": {"mag_index": 19, "dose_rate_e_per_a2_s": 1.0,
                                           "defocus_offset_um": -30.0}},
    }


def run_demo(console: Console, work: Path, *, squares: int, targets_per_square: int,
             seed: int, timeout_s: float) -> int:
    """Start the service in ``work``, run one session through the API, stop; exit status."""
    data = work / "data"
    text, bind, events = demo_config(data, seed)
    config = work / "clemd-demo.toml"
    config.write_text(text, encoding="utf-8")
    log_path = work / "service.log"
    console.print(f"[bold]clemd demo[/bold]: service on {bind}, data in {data}, log {log_path}")
    log_path.write_bytes(b"")
    service = ServiceProcess(config, log_path)
    try:
        with ClemdClient(bind, events, timeout_s=10.0) as client:
            service.start(client, 60.0)
            return _session(console, client, squares, targets_per_square, timeout_s)
    finally:
        _stop(console, service, bind, events)


def _session(console: Console, client: ClemdClient, squares: int, targets_per_square: int,
             timeout_s: float) -> int:
    created = client.create_session("autoclem", demo_params(squares, targets_per_square),
                                    name="demo", start=True)
    sid = created["id"]
    console.print(f"session {sid} created and started: {squares} squares, up to "
                  f"{targets_per_square} targets per square")
    deadline = time.monotonic() + timeout_s
    while True:
        watch(client, sid, console, timeout_s=max(1.0, deadline - time.monotonic()))
        info = client.session(sid)["session"]
        if info["state"] in ("completed", "failed", "aborted", "paused") \
                or time.monotonic() > deadline:
            break
    return _summary(console, info)


def _summary(console: Console, info: dict[str, Any]) -> int:
    folder = Path(info["data_dir"])
    if info["state"] != "completed":
        console.print(f"[red]session {info['id']} {info['state']}[/red]: "
                      f"{info['message'] or (info['error'] or {}).get('message', '')}")
        return 1
    summary = json.loads((folder / "report" / "summary.json").read_text(encoding="utf-8"))
    table = Table(title=f"targets of session {info['id']}",
                  caption="errors in nm; true error: simulation only")
    for col in ("target", "square", "predicted", "true", "status"):
        table.add_column(col, no_wrap=True, justify="right" if col in ("predicted", "true")
                         else "left")
    for t in summary["targets"]:
        table.add_row(t["id"], t["square"], _nm(t["predicted_error_um"], 1e3),
                      _nm(t["true_error_nm"], 1.0),
                      "[green]tilt series[/green]" if t["status"] == "collected"
                      else f"[yellow]{t['status']}[/yellow]")
    console.print(table)
    for t in summary["targets"]:
        if t["status"] != "collected":
            console.print(f"  {t['id']} {t['status']}: {t['reason']}")
    times = Table(title="seconds per stage (instrument time modelled)")
    for col in ("stage", "compute", "instrument", "AutoCLEM"):
        times.add_column(col, no_wrap=True, justify="left" if col == "stage" else "right")
    for st in summary["timings"]:
        times.add_row(st["stage"], f"{st['compute_s']:.1f}", f"{st['hardware_s']:.0f}",
                      "-" if st["autoclem_s"] is None else f"{st['autoclem_s']:.0f}")
    console.print(times)
    collected = sum(t["status"] == "collected" for t in summary["targets"])
    console.print(f"report: [bold]{folder / 'report' / 'index.html'}[/bold]")
    console.print(f"{collected} tilt series collected of {len(summary['targets'])} targets")
    return 0 if collected else 1


def _nm(value: float | None, factor: float) -> str:
    return "-" if value is None else f"{value * factor:.0f}"


def _stop(console: Console, service: ServiceProcess, bind: str, events: str) -> None:
    """Ask the service to shut down and wait; as a last resort SIGTERM, then SIGKILL."""
    if service.returncode is None and service.proc is not None:
        try:
            with ClemdClient(bind, events, timeout_s=5.0) as client:
                client.call("shutdown")
        except ClemdApiError as err:
            console.print(f"[yellow]shutdown request failed[/yellow] ({err}); terminating")
        if service.wait(60.0) is None:
            console.print("[yellow]service did not stop within 60 s[/yellow]; terminating")
            service.stop(30.0)
    console.print(f"service stopped (exit status {service.returncode})")


MARKER = ".clemd-demo"


class DemoFolderInUse(ValueError):
    """The output folder holds something the demo did not write; it is never emptied."""


def fresh_folder(out: Path) -> Path:
    """Empty ``out`` for a new demo (a left-over journal would resume the old session), but
    only if it is empty or a previous demo's (marked): never delete a user's files."""
    if out.exists():
        if not out.is_dir():
            raise DemoFolderInUse(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise DemoFolderInUse(f"{out} is not empty and not a clemd demo folder; "
                                  "choose another with --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by make demo; emptied by the next one\n",
                              encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clemd-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--squares", type=int, default=2)
    ap.add_argument("--targets-per-square", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3, help="simulated specimen and instruments")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds for the session")
    ap.add_argument("--out", "--keep", dest="out", type=Path, default=Path("demo-output"),
                    help="folder for the service's data, log and the report (default "
                         "demo-output; emptied first if a previous demo wrote it)")
    ns = ap.parse_args(argv)
    console = Console()
    try:
        out = fresh_folder(ns.out)
    except (DemoFolderInUse, OSError) as exc:
        console.print(f"[red]clemd-demo: {exc}[/red]")
        return 2
    try:
        return run_demo(console, out.resolve(), squares=ns.squares,
                        targets_per_square=ns.targets_per_square, seed=ns.seed,
                        timeout_s=ns.timeout)
    except ServiceStartFailed as exc:
        console.print(f"[red]clemd-demo: {exc}[/red]")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
