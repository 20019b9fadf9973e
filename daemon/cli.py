"""``clemd``: the service and its tools.

    clemd serve --config FILE        run the service until SIGTERM or the shutdown method
    clemd check-config --config FILE validate a config file and exit (0 ok, 2 error)
    clemd keys --dir DIR NAME...     write CurveZMQ key pairs NAME.key / NAME.key_secret
    clemd correlate ...              offline correlation (daemon/correlate_cmd.py)
    clemd sim serialem ...           the simulated SerialEM socket server
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from pathlib import Path
from types import FrameType

import structlog

from daemon import logs
from daemon.config import load_config
from drivers.errors import ClemdError, ConfigError

log = structlog.get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clemd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", required=True, type=Path)
    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("--config", required=True, type=Path)
    keys = sub.add_parser("keys", help="generate CurveZMQ key pairs")
    keys.add_argument("--dir", required=True, type=Path, help="folder to write the keys to")
    keys.add_argument("names", nargs="+", help="one key pair per name (e.g. server alice)")
    sub.add_parser("correlate", help="offline correlation (see `clemd correlate --help`)",
                   add_help=False)
    sub.add_parser("sim", help="simulators (`clemd sim serialem --help`)", add_help=False)
    return p


def _serve(config: Path) -> int:
    from daemon.service import Service

    try:
        cfg = load_config(config)
    except ConfigError as err:
        print(f"clemd: config error: {err}", file=sys.stderr)
        return 2
    logs.configure(cfg.log_level)
    service = Service(cfg)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("service.signal", signal=signal.Signals(signum).name)
        service.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        service.start()
    except ClemdError as err:
        log.error("service.start_failed", error=str(err), error_type=type(err).__name__)
        print(f"clemd: cannot start: {err}", file=sys.stderr)
        return 1
    try:
        service.serve()
    finally:
        service.close()
    return 0


def _check(config: Path) -> int:
    try:
        load_config(config)
    except ConfigError as err:
        print(f"clemd: config error: {err}", file=sys.stderr)
        return 2
    print(f"{config}: ok")
    return 0


def _keys(folder: Path, names: list[str]) -> int:
    from daemon.security import generate_keys

    for name in names:
        public, secret = generate_keys(folder, name)
        print(f"{name}: public {public}  secret {secret}")
    return 0


def _delegate(module: str, what: str, rest: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        print(f"clemd: {what} is not available ({err})", file=sys.stderr)
        return 2
    code: int = mod.main(rest)
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "correlate":
        return _delegate("daemon.correlate_cmd", "clemd correlate", args[1:])
    if args and args[0] == "sim":
        if len(args) < 2 or args[1] != "serialem":
            print("clemd sim: usage: clemd sim serialem [options]", file=sys.stderr)
            return 2
        return _delegate("simulators.serialem_server", "clemd sim serialem", args[2:])
    ns = _parser().parse_args(args)
    if ns.command == "serve":
        return _serve(ns.config)
    if ns.command == "check-config":
        return _check(ns.config)
    if ns.command == "keys":
        return _keys(ns.dir, ns.names)
    return 2


if __name__ == "__main__":
    sys.exit(main())
