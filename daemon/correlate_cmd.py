"""`clemd correlate points|beads|atlas`: offline correlation without a microscope.

The contract (docs/clem-workflow.md, "The offline correlation command"): JSON written to
``--out``; exit 0 for "ok", 3 for "no_confident_match", 2 for unusable input with exactly
one line on stderr and never a traceback. daemon/cli.py dispatches ``clemd correlate ...``
to :func:`main` with the arguments after ``correlate``; ``python -m daemon.correlate_cmd``
works as well.

Each subcommand is one entry of ``SUBCOMMANDS``: a function adding its arguments and a
function running it and returning the output model (daemon/correlate_schema.py); image
reading and the image subcommands live in daemon/correlate_images.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from daemon.correlate_images import run_atlas, run_beads
from daemon.correlate_schema import CorrelateOutput, output_model
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.points import correlate_points

EXIT_OK, EXIT_UNUSABLE, EXIT_NO_MATCH = 0, 2, 3


class _UsageError(Exception):
    """argparse refused the command line; carries argparse's one-line message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def read_xy_csv(path: Path, label: str, *, with_id: bool = False
                ) -> tuple[list[str], np.ndarray]:
    """Read a CSV with header ``x,y`` (or ``id,x,y``); return ids and an (N, 2) array.

    Raises CorrelationInputError naming the file and row for anything unusable.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CorrelationInputError(f"{label} {path}: cannot read ({err})") from err
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise CorrelationInputError(f"{label} {path}: empty file, expected a header")
    header = [c.strip().lower() for c in rows[0]]
    need = ["id", "x", "y"] if with_id else ["x", "y"]
    missing = [c for c in need if c not in header]
    if missing:
        raise CorrelationInputError(f"{label} {path}: header {rows[0]} lacks column(s) "
                                    f"{', '.join(missing)} (expected {','.join(need)})")
    col = {c: header.index(c) for c in need}
    ids: list[str] = []
    xy: list[tuple[float, float]] = []
    for n, row in enumerate(rows[1:], start=2):
        try:
            x, y = float(row[col["x"]]), float(row[col["y"]])
        except (IndexError, ValueError) as err:
            raise CorrelationInputError(f"{label} {path}: line {n}: not a number pair "
                                        f"({err})") from err
        if not (math.isfinite(x) and math.isfinite(y)):
            raise CorrelationInputError(f"{label} {path}: line {n}: NaN or infinite coordinate")
        xy.append((x, y))
        ids.append(row[col["id"]].strip() if with_id else str(len(ids)))
    return ids, np.array(xy, dtype=np.float64).reshape(-1, 2)


def _add_points_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", type=Path, required=True, help="LM bead positions, CSV x,y in um")
    p.add_argument("--em", type=Path, required=True, help="EM bead positions, CSV x,y in um")
    p.add_argument("--targets", type=Path, help="targets, CSV id,x,y in LM um")
    p.add_argument("--out", type=Path, required=True, help="output JSON")
    p.add_argument("--prior", type=Path,
                   help="optional JSON with a 2x3 LM->EM 'matrix' (e.g. a transform written "
                        "by the atlas step) used as an extra seed, never required")


def _read_prior(path: Path | None) -> np.ndarray | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        matrix = np.asarray(data["matrix"] if isinstance(data, dict) else data, dtype=float)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as err:
        raise CorrelationInputError(f"prior {path}: cannot read a 2x3 'matrix' ({err})") from err
    if matrix.shape != (2, 3):
        raise CorrelationInputError(f"prior {path}: 'matrix' must be 2x3, got {matrix.shape}")
    return matrix


def _run_points(args: argparse.Namespace, started: float) -> CorrelateOutput:
    _, lm = read_xy_csv(args.lm, "LM")
    _, em = read_xy_csv(args.em, "EM")
    for label, pts, path in (("LM", lm, args.lm), ("EM", em, args.em)):
        if len(pts) < 2:
            raise CorrelationInputError(f"{label} {path}: {len(pts)} bead(s), need at least 2")
    ids, targets = (read_xy_csv(args.targets, "targets", with_id=True) if args.targets
                    else ([], np.zeros((0, 2))))
    res = correlate_points(lm, em, targets, prior=_read_prior(args.prior),
                           from_frame="lm_um", to_frame="em_um")
    return output_model("points", res, lm, em, ids, "um", started)


def _add_image_args(p: argparse.ArgumentParser, points_flag: str) -> None:
    p.add_argument("--lm", type=Path, required=True)
    p.add_argument("--lm-pixel-um", type=float, required=True)
    p.add_argument("--em", type=Path, required=True)
    p.add_argument("--em-pixel-um", type=float, required=True)
    p.add_argument(points_flag, type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)


def _run_beads(args: argparse.Namespace, started: float) -> CorrelateOutput:
    ids, targets = read_xy_csv(args.targets, "targets", with_id=True)
    return run_beads(args, started, ids, targets)


def _run_atlas(args: argparse.Namespace, started: float) -> CorrelateOutput:
    ids, points = read_xy_csv(args.points, "points", with_id=True)
    return run_atlas(args, started, ids, points)


@dataclass(frozen=True)
class Subcommand:
    """One `clemd correlate` subcommand: its arguments and its runner."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, float], CorrelateOutput]


SUBCOMMANDS: dict[str, Subcommand] = {
    "points": Subcommand("bead positions (um) without pairs", _add_points_args, _run_points),
    "beads": Subcommand("fLM bead image and EM map of one square",
                        lambda p: _add_image_args(p, "--targets"), _run_beads),
    "atlas": Subcommand("fLM overview and EM atlas of the grid",
                        lambda p: _add_image_args(p, "--points"), _run_atlas),
}


def build_parser() -> argparse.ArgumentParser:
    """The `clemd correlate` parser; errors raise instead of printing usage."""
    parser = _Parser(prog="clemd correlate", description="Correlate LM and EM offline.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, spec in SUBCOMMANDS.items():
        spec.add_arguments(sub.add_parser(name, help=spec.help))
    return parser


def _write_json(path: Path, out: CorrelateOutput) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(out.model_dump_json(indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        raise CorrelationInputError(f"--out {path}: cannot write ({err})") from err


def main(argv: list[str] | None = None) -> int:
    """Run `clemd correlate ...`; return the exit status (0 ok, 3 no match, 2 unusable)."""
    started = time.perf_counter()
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        out = SUBCOMMANDS[args.command].run(args, started)
        _write_json(args.out, out)
    except _UsageError as err:
        print(f"clemd correlate: {err}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (CorrelationInputError, np.linalg.LinAlgError) as err:
        message = " ".join(str(err).split())  # exactly one line
        print(f"clemd correlate: {message}", file=sys.stderr)
        return EXIT_UNUSABLE
    return EXIT_OK if out.status == "ok" else EXIT_NO_MATCH


if __name__ == "__main__":
    raise SystemExit(main())
