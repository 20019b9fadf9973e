"""The AutoCLEM session benchmark; prints ONE JSON object on stdout.

Per seed, a whole session (protocols/autoclem.py) on the simulators as the CI test runs it
(tests/protocols/session_sim.py: the real 3.05 mm grid, small cameras, three time points,
five tilts from -6 to +6 degrees), the operator checkpoint confirmed at once:

- ``stages``: per stage, compute seconds (wall time in the steps' actions: the protocols'
  own computing and, on instrument steps, the simulators' rendering) against modelled
  instrument seconds (the virtual clock), with AutoCLEM's figure where the paper gives one
  (atlas correlation 600 s, bead correlation and transfer 600 s per square);
- ``targets``: per target, the predicted error (nm), the true error (nm: the 0-degree record's
  centre against the virus the target came from, simulator truth), or the reason it was
  skipped;
- summary, over all seeds: targets, targets collected, targets reached within 100 nm and
  150 nm as fractions of all targets (the issue's measure: a skipped target is not reached)
  and of those collected, median and worst true error, and how many targets were skipped
  for each kind of reason (``skip_reasons``).

Run: ``python -m benchmarks.session [--seeds N] [--first S]`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "protocols"))

from session_sim import params, specimen, world

from protocols.autoclem import CHECKPOINT_KEY, REPORT_KEY, AutoCLEMPlan
from protocols.plan import MemoryStepStore, RunControl, run_plan


def session_case(seed: int) -> dict[str, Any]:
    """One whole session on the simulators; its stages and targets."""
    spec = specimen(seed)
    w = world(spec, seed=seed)
    with tempfile.TemporaryDirectory(prefix=f"clemd-session-{seed}-") as tmp:
        ctx = w.context(Path(tmp), MemoryStepStore())
        control = RunControl()
        control.confirmed.add(CHECKPOINT_KEY)
        t0 = time.perf_counter()
        run_plan(AutoCLEMPlan(params(spec)), ctx, control)
        wall = time.perf_counter() - t0
        report = ctx.result(REPORT_KEY)
        squares = ctx.result("correlate/atlas")["squares"]
    targets = [{"id": t["id"], "square": t["square"], "status": t["status"],
                "reason": t["reason"],
                "predicted_error_nm": None if t["predicted_error_um"] is None
                else round(t["predicted_error_um"] * 1e3, 1),
                "true_error_nm": None if t["true_error_nm"] is None
                else round(t["true_error_nm"], 1)} for t in report["targets"]]
    return {"seed": seed, "wall_s": round(wall, 1), "modelled_s": round(w.clock.now(), 1),
            "squares": [{"key": s["key"], "status": s["status"]} for s in squares],
            "stages": [{**t, "compute_s": round(t["compute_s"], 2),
                        "hardware_s": round(t["hardware_s"], 1)} for t in report["timings"]],
            "targets": targets}


#: Skip reasons by their first words (protocols/autoclem_correlate.py transfer_targets,
#: protocols/autoclem.py realign), for counting.
SKIP_KINDS = (("square ", "square not placed in the EM"),
              ("bead correlation", "bead correlation refused"),
              ("outside the square map", "outside the square map"),
              ("on square-map tile", "on an unplaced square-map tile"),
              ("predicted error", "predicted error over the limit"),
              ("far outside the matched beads", "extrapolated"),
              ("realign did not converge", "realign did not converge"),
              ("RealignError", "realign found no match"),
              ("AlignmentError", "realign found no match"))


def skip_kind(reason: str) -> str:
    """The kind of a skip reason, for the summary's counts."""
    return next((kind for start, kind in SKIP_KINDS if reason.startswith(start)), "other")


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    true = [t["true_error_nm"] for r in rows for t in r["targets"]
            if t["status"] == "collected" and t["true_error_nm"] is not None]
    n_targets = sum(len(r["targets"]) for r in rows)
    skips: dict[str, int] = {}
    for r in rows:
        for t in r["targets"]:
            if t["status"] != "collected":
                kind = skip_kind(t["reason"] or "")
                skips[kind] = skips.get(kind, 0) + 1
    stages: dict[str, dict[str, float]] = {}
    for r in rows:
        for s in r["stages"]:
            agg = stages.setdefault(s["stage"], {"compute_s": 0.0, "hardware_s": 0.0})
            agg["compute_s"] += s["compute_s"] / len(rows)
            agg["hardware_s"] += s["hardware_s"] / len(rows)
            if s["autoclem_s"] is not None:
                agg["autoclem_s"] = agg.get("autoclem_s", 0.0) + s["autoclem_s"] / len(rows)
    return {
        "seeds": [r["seed"] for r in rows],
        "targets": n_targets,
        "collected": len(true),
        "reached_within_100nm": (sum(v <= 100.0 for v in true) / n_targets
                                 if n_targets else None),
        "reached_within_150nm": (sum(v <= 150.0 for v in true) / n_targets
                                 if n_targets else None),
        "skip_reasons": dict(sorted(skips.items())),
        "fraction_within_100nm": float(np.mean(np.array(true) <= 100.0)) if true else None,
        "fraction_within_150nm": float(np.mean(np.array(true) <= 150.0)) if true else None,
        "median_true_error_nm": float(np.median(true)) if true else None,
        "max_true_error_nm": float(np.max(true)) if true else None,
        "mean_stage_seconds": {k: {kk: round(vv, 2) for kk, vv in v.items()}
                               for k, v in stages.items()},
        "mean_wall_s": float(np.mean([r["wall_s"] for r in rows])),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="number of sessions (default 3)")
    ap.add_argument("--first", type=int, default=3, help="first specimen seed (default 3)")
    ns = ap.parse_args(argv)
    rows = [session_case(ns.first + k) for k in range(ns.seeds)]
    json.dump({"summary": summary(rows), "sessions": rows}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
