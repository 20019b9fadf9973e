"""``clemctl``: talk to a running clemd.

    clemctl status
    clemctl sessions [--state running ...]        clemctl show ID
    clemctl create TEMPLATE [--params JSON] [--name N] [--start]
    clemctl start|pause|resume ID                 clemctl abort ID [--reason R]
    clemctl confirm ID [KEY]                      (KEY: the checkpoint it waits for)
    clemctl targets submit ID FILE.csv [--frame lm_stage]   (header: x,y[,z,id,label,frame])
    clemctl targets list ID                       clemctl targets remove ID TARGET...
    clemctl queue | enqueue TEMPLATE [--params JSON] | reorder ID POS | cancel ID
    clemctl devices                               clemctl shutdown
    clemctl watch ID [--timeout S]                (live progress; exit 0 completed,
                                                   3 needs an operator, 1 aborted/failed)

Exit status: 0 ok, 1 refused by the service, 2 bad usage or input, 4 no reply in time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from daemon.client import (
    DEFAULT_ADDRESS,
    DEFAULT_EVENTS,
    ClemdApiError,
    ClemdClient,
    ClientTimeout,
    CurveClientKeys,
)
from daemon.watch import watch

BATCH = 1000


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clemctl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=DEFAULT_ADDRESS)
    p.add_argument("--events", default=DEFAULT_EVENTS)
    p.add_argument("--secret-key", type=Path, help="this client's .key_secret (CURVE)")
    p.add_argument("--server-key", type=Path, help="the service's public .key (CURVE)")
    p.add_argument("--timeout", type=float, default=10.0, help="reply timeout, seconds")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status")
    sub.add_parser("devices")
    sub.add_parser("queue")
    sub.add_parser("shutdown")
    s = sub.add_parser("sessions")
    s.add_argument("--state", action="append")
    for name in ("show", "start", "pause", "resume", "cancel"):
        sub.add_parser(name).add_argument("session_id")
    a = sub.add_parser("abort")
    a.add_argument("session_id")
    a.add_argument("--reason", default="")
    c = sub.add_parser("confirm")
    c.add_argument("session_id")
    c.add_argument("key", nargs="?")
    for name in ("create", "enqueue"):
        cr = sub.add_parser(name)
        cr.add_argument("template")
        cr.add_argument("--params", default="{}", help="template params as JSON")
        cr.add_argument("--name", default="")
        if name == "create":
            cr.add_argument("--start", action="store_true")
    r = sub.add_parser("reorder")
    r.add_argument("session_id")
    r.add_argument("position", type=int)
    w = sub.add_parser("watch")
    w.add_argument("session_id")
    w.add_argument("--timeout", dest="watch_timeout", type=float, default=None)
    t = sub.add_parser("targets")
    tsub = t.add_subparsers(dest="tcmd", required=True)
    ts = tsub.add_parser("submit")
    ts.add_argument("session_id")
    ts.add_argument("csv", type=Path)
    ts.add_argument("--frame", default="lm_stage")
    tsub.add_parser("list").add_argument("session_id")
    tr = tsub.add_parser("remove")
    tr.add_argument("session_id")
    tr.add_argument("target_ids", nargs="+")
    return p


def read_targets_csv(path: Path, frame: str) -> list[dict[str, Any]]:
    """Targets from CSV with header x,y and optional z,id,label,frame; numbers checked."""
    out = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"x", "y"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: header needs x and y (missing {sorted(missing)})")
        for line, row in enumerate(reader, start=2):
            try:
                t: dict[str, Any] = {"x": float(row["x"]), "y": float(row["y"]),
                                     "frame": row.get("frame") or frame}
                if row.get("z"):
                    t["z"] = float(row["z"])
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            if row.get("id"):
                t["id"] = row["id"]
            if row.get("label"):
                t["label"] = row["label"]
            out.append(t)
    if not out:
        raise ValueError(f"{path}: no targets")
    return out


def _sessions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "template", "state", "steps", "message")
    for r in rows:
        table.add_row(r["id"], r["name"], r["template"], r["state"], str(r["steps_done"]),
                      r["message"] or (r["error"] or {}).get("message", ""))
    return table


def _run(ns: argparse.Namespace, c: ClemdClient, out: Console) -> int:
    show: Callable[[Any], None] = (lambda v: out.print_json(json.dumps(v))) if ns.json else \
        (lambda v: out.print(v))
    sid: str = getattr(ns, "session_id", "")
    simple = {"start": "sessions.start", "pause": "sessions.pause", "resume": "sessions.resume",
              "cancel": "jobs.cancel", "show": "sessions.get"}
    if ns.cmd == "status":
        st = c.status()
        show(st if ns.json else f"clemd {st['version']} {st['state']}, clock {st['clock']}, "
             f"sessions {st['sessions']}, queue {st['queue']}, role {st['role']}")
    elif ns.cmd in simple:
        res = c.call(simple[ns.cmd], {"session_id": sid})
        s = res.get("session", res)
        show(res if ns.json else f"{s['id']}: {s['state']} ({s['reason']}) {s['message']}")
    elif ns.cmd == "sessions":
        rows = c.call("sessions.list", {"states": ns.state})["sessions"]
        show(rows if ns.json else _sessions_table(rows))
    elif ns.cmd == "queue":
        rows = c.call("jobs.list")["sessions"]
        show(rows if ns.json else _sessions_table(rows))
    elif ns.cmd in ("create", "enqueue"):
        params = json.loads(ns.params)
        if ns.cmd == "create":
            s = c.create_session(ns.template, params, ns.name, ns.start)
        else:
            s = c.call("jobs.enqueue", {"template": ns.template, "params": params,
                                        "name": ns.name})
        show(s if ns.json else f"{s['id']}: {s['state']}")
    elif ns.cmd == "abort":
        s = c.call("sessions.abort", {"session_id": sid, "reason": ns.reason})
        show(s if ns.json else f"{s['id']}: {s['state']}")
    elif ns.cmd == "confirm":
        key = ns.key or c.session(sid)["session"]["waiting_key"]
        if not key:
            out.print(f"{sid} is not waiting for a confirmation")
            return 1
        s = c.call("sessions.confirm", {"session_id": sid, "key": key})
        show(s if ns.json else f"{s['id']}: confirmed {key}, {s['state']}")
    elif ns.cmd == "reorder":
        rows = c.call("jobs.reorder", {"session_id": sid, "position": ns.position})["sessions"]
        show(rows if ns.json else _sessions_table(rows))
    elif ns.cmd == "devices":
        rows = c.call("devices.status")["devices"]
        show(rows if ns.json else "\n".join(
            f"{d['name']:8} {d['kind']:12} {d['worker']:5} {d['step'] or ''}" for d in rows))
    elif ns.cmd == "shutdown":
        show(c.call("shutdown"))
    elif ns.cmd == "watch":
        return watch(c, sid, out, ns.watch_timeout)
    elif ns.cmd == "targets":
        return _targets(ns, c, show)
    return 0


def _targets(ns: argparse.Namespace, c: ClemdClient, show: Callable[[Any], None]) -> int:
    if ns.tcmd == "submit":
        targets = read_targets_csv(ns.csv, ns.frame)
        new = 0
        for i in range(0, len(targets), BATCH):
            new += c.submit_targets(ns.session_id, targets[i:i + BATCH])["created"]
        show({"acknowledged": len(targets), "new": new} if ns.json else
             f"{len(targets)} targets acknowledged ({new} new)")
    elif ns.tcmd == "list":
        rows = c.call("targets.list", {"session_id": ns.session_id})["targets"]
        if ns.json:
            show(rows)
        else:
            table = Table("id", "label", "frame", "x", "y", "z")
            for t in rows:
                table.add_row(t["id"], t["label"], t["frame"], f"{t['x']:g}", f"{t['y']:g}",
                              "" if t["z"] is None else f"{t['z']:g}")
            show(table)
    else:
        show(c.call("targets.remove", {"session_id": ns.session_id,
                                       "target_ids": ns.target_ids}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    out, err = Console(), Console(stderr=True)
    try:
        keys = None
        if ns.secret_key or ns.server_key:
            if not (ns.secret_key and ns.server_key):
                err.print("clemctl: --secret-key and --server-key go together")
                return 2
            keys = CurveClientKeys(ns.secret_key, ns.server_key)
        with ClemdClient(ns.address, ns.events, timeout_s=ns.timeout, keys=keys) as c:
            return _run(ns, c, out)
    except ClientTimeout as e:
        err.print(f"clemctl: {e.message} (is clemd running at {ns.address}?)")
        return 4
    except ClemdApiError as e:
        err.print(f"clemctl: {e}")
        return 1
    except (ValueError, OSError) as e:
        err.print(f"clemctl: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
