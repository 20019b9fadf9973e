"""``clemctl watch``: a live progress bar for one session, from its PUB events."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from daemon.client import ClemdClient

END = {"completed": 0, "aborted": 1, "failed": 1, "paused": 3, "waiting_operator": 3,
       "interrupted": 3}


def _eta(eta_s: float | None) -> str:
    """Time left at the pace so far (on simulated instruments: modelled instrument time)."""
    if eta_s is None:
        return ""
    minutes, seconds = divmod(round(eta_s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{seconds:02d}" if hours else \
        f"ETA {minutes}:{seconds:02d}"


def _size(n: int) -> str:
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def watch(client: ClemdClient, session_id: str, out: Console,
          timeout_s: float | None = None) -> int:
    """Follow a session until it ends or needs an operator; exit code per ``END``.

    Progress, images and warnings arrive as events; the session is re-read on every state
    event and at least once a second, so a missed event only delays the display.
    """
    stream = client.subscribe([f"{k}.{session_id}" for k in
                               ("progress", "state", "image", "warning")])
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        info = client.session(session_id)["session"]
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[eta]}"), TimeElapsedColumn(), console=out,
                      transient=False) as bar:
            task = bar.add_task(f"{info['id']} {info['state']}", total=None,
                                completed=info["steps_done"], eta="")
            while info["state"] not in END:
                if deadline is not None and time.monotonic() > deadline:
                    out.print(f"{session_id}: still {info['state']} after {timeout_s:g} s")
                    return 4
                ev = stream.next(1.0)
                if ev is None or ev["kind"] == "state":
                    info = client.session(session_id)["session"]
                    bar.update(task, description=f"{info['id']} {info['state']}",
                               completed=info["steps_done"])
                    continue
                p = ev["payload"]
                if ev["kind"] == "progress":
                    bar.update(task, total=p["total"], completed=p["done"], eta=_eta(p["eta_s"]),
                               description=f"{info['id']} {p['title'] or p['key']}")
                elif ev["kind"] == "image":
                    bar.console.print(f"  image {p['path']} ({p['kind']}, "
                                      f"{_size(p['size_bytes'])})")
                elif ev["kind"] == "warning":
                    bar.console.print(f"  [yellow]warning[/yellow] {p['message']}")
            if info["state"] == "completed":     # the plan's total was an estimate
                bar.update(task, total=info["steps_done"], completed=info["steps_done"], eta="")
        state = info["state"]
        detail = info["message"] or (info["error"] or {}).get("message", "")
        if state == "waiting_operator":
            out.print(f"{session_id} waits for the operator: {info['waiting_key']} "
                      f"(clemctl confirm {session_id})")
        else:
            out.print(f"{session_id} {state}: {detail}")
        return END[state]
    finally:
        stream.close()
