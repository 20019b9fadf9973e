"""Correlation accuracy benchmark; prints ONE JSON object to stdout.

Point-set part: simulated grid squares (bead layouts uniform / clustered / ring, 5-20
beads, scale 0.9-1.1 with a few % anisotropy, arbitrary rotation, mirror half the time, smooth distortion,
LM and EM localisation noise, beads lost and spurious points on both sides) across
difficulty tiers. Each square is correlated with :func:`correlate_points` and judged against
ground truth: correct (ok and median target error < 250 nm), no confident match,
confidently wrong (ok but not correct), target errors, the oracle ratio (our error over the
error of the same model fitted to the true correspondences) and whether the predicted error
tracks the true one (fractions of true errors within 1x and 2x the predicted RMS error,
over every accepted square). The image part (benchmarks/correlation_images.py: simulated fLM and EM
images of squares) and the atlas part (benchmarks/correlation_atlas.py: whole-grid
overviews from the simulators and from tests/protocols/grid_render.py) follow.

How realistic the point squares are (reviewed for issue 3): targets are spread over the
central +-27 um of the 90 um square, as virus particles near the cells of a chosen square
are. Beads are uniform (as simulators/specimen_build.py places them), in a ring, or in 2-4
tight clusters (sd 6 um); with clusters, targets often lie 20-50 um outside the matched
beads, a square the session's selection would not choose (it wants the cell periphery
inside the beads) but one a user of ``clemd correlate points`` may bring, so it stays as
the hard case. The bend is scaled so that the largest relative displacement across the
square is exactly 0.1-0.5 um, harsher than the specimen simulator, which only bounds it.
Refusing such squares is right when they would be wrong: with the old gate (1%/um
extrapolation allowance, 0.3 um limit) 46 of the 62 refused-but-matched squares of seeds
1-13 would in fact have been correct, which is what the calibrated error fixed.

Run from the repository root: ``.venv/bin/python -m benchmarks.correlation [--squares-per-tier N]
[--image-squares-per-tier N] [--atlases N] [--synthetic-atlases N] [--seed S]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # "per square on one core": no BLAS threads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # after the repo: benchmarks/ may shadow
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.points import correlate_points
from protocols.correlation.transform_average import AveragedTransform

FloatArray = NDArray[np.float64]
CORRECT_NM = 250.0


@dataclass(frozen=True)
class PointSquareSpec:
    """Parameters of one simulated square; fractions are per modality, lengths um."""

    n_beads: int
    loss_lm: float
    loss_em: float
    spurious_lm: float  # fraction of the LM list that is spurious
    spurious_em: float
    mirrored: bool
    layout: str = "uniform"  # uniform | clustered | ring
    distortion: str = "sine"  # sine | radial
    distortion_um: float = 0.3
    square_um: float = 90.0
    noise_lm_um: float = 0.03
    noise_em_um: float = 0.01
    n_targets: int = 5


@dataclass(frozen=True)
class PointSquare:
    """LM and EM detections (um, own frames), targets, truth."""

    lm: FloatArray
    em: FloatArray
    targets_lm: FloatArray
    targets_em_true: FloatArray
    true_pairs: NDArray[np.intp]


def _layout(rng: np.random.Generator, spec: PointSquareSpec) -> FloatArray:
    half = spec.square_um / 2
    pts: list[FloatArray] = []
    centres = rng.uniform(-0.7 * half, 0.7 * half, (rng.integers(2, 5), 2))
    while len(pts) < spec.n_beads:
        if spec.layout == "clustered":
            p = centres[rng.integers(len(centres))] + rng.normal(0, 6.0, 2)
        elif spec.layout == "ring":
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 0.95) * half
            p = rad * np.array([np.cos(ang), np.sin(ang)])
        else:
            p = rng.uniform(-half, half, 2)
        if np.all(np.abs(p) <= half) and all(np.hypot(*(p - q)) > 1.0 for q in pts):
            pts.append(p)
    return np.array(pts)


def _distortion(rng: np.random.Generator, spec: PointSquareSpec):  # type: ignore[no-untyped-def]
    """Smooth displacement field whose largest change across the square is as asked.

    "Up to 0.5 um across a 90 um square": the field is scaled so that two points of the
    square move relative to each other by at most ``distortion_um`` (a constant offset is
    no distortion). Sine modes have wavelengths of at least 60 um (smooth at the scale of
    bead spacing); the radial mode is cubic about an off-centre point.
    """
    half = spec.square_um / 2
    if spec.distortion == "radial":
        k, centre = rng.uniform(-1, 1), rng.uniform(-20, 20, 2)

        def raw(g: FloatArray) -> FloatArray:
            d = g - centre
            return k * d * np.sum(d ** 2, axis=1, keepdims=True)
    else:
        w = rng.normal(0, 2 * np.pi / 150.0, (3, 2))
        w_len = np.linalg.norm(w, axis=1, keepdims=True)
        w = w * np.minimum(1.0, (2 * np.pi / 60.0) / np.maximum(w_len, 1e-12))
        ph, amp = rng.uniform(0, 2 * np.pi, 3), rng.normal(0, 1, (3, 2))

        def raw(g: FloatArray) -> FloatArray:
            return np.sin(g @ w.T + ph) @ amp
    grid = np.stack(np.meshgrid(np.linspace(-half, half, 21), np.linspace(-half, half, 21)),
                    -1).reshape(-1, 2)
    field = raw(grid)
    norm = float(np.max(np.linalg.norm(field[:, None] - field[None], axis=2))) or 1.0
    return lambda g: raw(g) * (spec.distortion_um / norm)


def make_point_square(rng: np.random.Generator, spec: PointSquareSpec) -> PointSquare:
    """Simulate bead detections of one square in LM and EM with ground truth."""
    grid = _layout(rng, spec)
    theta = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    # The contract's "scale 1 within 10%", times a few % of anisotropy between the two
    # microscopes.
    stretch = rng.uniform(0.9, 1.1) * rng.uniform(0.97, 1.03, 2)
    lin = rot @ np.diag(stretch) @ (np.diag([-1.0, 1.0]) if spec.mirrored else np.eye(2))
    off_lm, off_em = rng.uniform(-500, 500, 2), rng.uniform(-2000, 2000, 2)
    dist = _distortion(rng, spec)

    def to_em(g: FloatArray) -> FloatArray:
        return g @ lin.T + dist(g) + off_em

    n = len(grid)
    keep_lm = rng.random(n) >= spec.loss_lm
    keep_em = rng.random(n) >= spec.loss_em
    lm = grid + off_lm + rng.normal(0, spec.noise_lm_um, (n, 2))
    em = to_em(grid) + rng.normal(0, spec.noise_em_um, (n, 2))
    half = spec.square_um / 2

    def spurious(count_true: int, frac: float) -> int:
        return round(frac / (1 - frac) * count_true) if frac < 1 else 0
    n_sl = spurious(int(keep_lm.sum()), spec.spurious_lm)
    n_se = spurious(int(keep_em.sum()), spec.spurious_em)
    lm_all = np.concatenate([lm[keep_lm], rng.uniform(-half, half, (n_sl, 2)) + off_lm])
    em_all = np.concatenate([em[keep_em], to_em(rng.uniform(-half, half, (n_se, 2)))])
    p_lm, p_em = rng.permutation(len(lm_all)), rng.permutation(len(em_all))
    lm_all, em_all = lm_all[p_lm], em_all[p_em]
    idx_lm = np.full(n, -1)
    idx_lm[np.flatnonzero(keep_lm)] = np.argsort(p_lm)[: keep_lm.sum()]
    idx_em = np.full(n, -1)
    idx_em[np.flatnonzero(keep_em)] = np.argsort(p_em)[: keep_em.sum()]
    both = keep_lm & keep_em
    tg = rng.uniform(-0.3 * spec.square_um, 0.3 * spec.square_um, (spec.n_targets, 2))
    return PointSquare(lm=lm_all, em=em_all, targets_lm=tg + off_lm, targets_em_true=to_em(tg),
                       true_pairs=np.stack([idx_lm[both], idx_em[both]], 1).astype(np.intp))


TIERS: dict[str, dict[str, tuple[float, float]]] = {
    "easy": {"loss": (0.1, 0.2), "spurious": (0.0, 0.1), "beads": (10, 20)},
    "medium": {"loss": (0.2, 0.4), "spurious": (0.1, 0.3), "beads": (8, 20)},
    "hard": {"loss": (0.4, 0.5), "spurious": (0.3, 0.5), "beads": (8, 20)},
    "extreme": {"loss": (0.5, 0.6), "spurious": (0.4, 0.5), "beads": (5, 20)},
}


def _spec(rng: np.random.Generator, tier: dict[str, tuple[float, float]], i: int
          ) -> PointSquareSpec:
    return PointSquareSpec(
        n_beads=int(rng.integers(tier["beads"][0], tier["beads"][1] + 1)),
        loss_lm=rng.uniform(*tier["loss"]), loss_em=rng.uniform(*tier["loss"]),
        spurious_lm=rng.uniform(*tier["spurious"]), spurious_em=rng.uniform(*tier["spurious"]),
        mirrored=bool(i % 2), layout=("uniform", "clustered", "ring")[i % 3],
        distortion=("sine", "radial")[(i // 2) % 2], distortion_um=rng.uniform(0.1, 0.5),
        noise_lm_um=rng.uniform(0.02, 0.04), noise_em_um=rng.uniform(0.005, 0.02))


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"squares": 0}
    ok = [r for r in rows if r["status"] == "ok"]
    errs = np.array([e for r in ok for e in r["target_errors_nm"]])
    ratios = np.array([r["oracle_ratio"] for r in ok if r["correct"] and "oracle_ratio" in r])
    free = np.array([r["oracle_ratio_noise_free"] for r in ok
                     if r["correct"] and "oracle_ratio_noise_free" in r])
    excess = np.array([r["oracle_excess_noise_free_nm"] for r in ok
                       if r["correct"] and "oracle_excess_noise_free_nm" in r])
    # Every accepted square's targets, right or wrong: calibration must hold where it is
    # relied on. For an isotropic 2D Gaussian error, 63% / 98% of errors fall within 1x /
    # 2x its RMS (68% / 95% are the 1D figures).
    cal = np.array([e / p for r in ok
                    for e, p in zip(r["target_errors_nm"], r["predicted_nm"])])
    n = max(len(rows), 1)
    return {
        "squares": len(rows),
        "fraction_correct": sum(r["correct"] for r in rows) / n,
        "fraction_no_confident_match": sum(r["status"] == "no_confident_match"
                                           for r in rows) / n,
        "fraction_unusable_input": sum(r["status"] == "unusable_input" for r in rows) / n,
        "confidently_wrong": sum(r["status"] == "ok" and not r["correct"] for r in rows),
        "median_target_error_nm": float(np.median(errs)) if errs.size else None,
        "p95_target_error_nm": float(np.percentile(errs, 95)) if errs.size else None,
        "oracle_ratio_median": float(np.median(ratios)) if ratios.size else None,
        "oracle_ratio_p90": float(np.percentile(ratios, 90)) if ratios.size else None,
        **({"oracle_ratio_noise_free_median": float(np.median(free)),
            "oracle_ratio_noise_free_p90": float(np.percentile(free, 90)),
            "oracle_excess_noise_free_nm_median": float(np.median(excess)),
            "oracle_excess_noise_free_nm_p90": float(np.percentile(excess, 90))}
           if free.size else {}),
        "calibration_median_true_over_predicted": float(np.median(cal)) if cal.size else None,
        "calibration_fraction_within_predicted": float(np.mean(cal <= 1)) if cal.size else None,
        "calibration_fraction_within_2x_predicted": float(np.mean(cal <= 2)) if cal.size else None,
        "seconds_per_square_median": float(np.median([r["seconds"] for r in rows])),
        "seconds_per_square_max": float(np.max([r["seconds"] for r in rows])),
    }


def _label(t: AveragedTransform) -> str:
    """The averaged transform's dominant mean, and "+field" when fields carry most weight."""
    return (("affine" if t.affine_weight >= 0.5 else "similarity")
            + ("+field" if t.field_weight >= 0.5 else ""))


def _run_square(sq: PointSquare) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = correlate_points(sq.lm, sq.em, sq.targets_lm)
    except CorrelationInputError:  # e.g. every bead lost on one side: the CLI's exit 2
        return {"status": "unusable_input", "shared": len(sq.true_pairs),
                "seconds": time.perf_counter() - t0, "correct": False}
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"status": res.status, "shared": len(sq.true_pairs), "seconds": seconds,
                           "correct": False}
    if res.status != "ok" or res.transform is None or res.targets_um is None:
        return row
    err = np.linalg.norm(res.targets_um - sq.targets_em_true, axis=1) * 1000
    row.update(target_errors_nm=err.tolist(), correct=bool(np.median(err) < CORRECT_NM),
               predicted_nm=(np.asarray(res.target_errors_um) * 1000).tolist(),
               model=_label(res.transform))
    truth = {tuple(p) for p in sq.true_pairs.tolist()}
    row["wrong_pairs"] = sum(tuple(p) not in truth for p in res.pairs.tolist())
    oracle = res.transform.refit(sq.lm[sq.true_pairs[:, 0]], sq.em[sq.true_pairs[:, 1]])
    o_err = np.linalg.norm(oracle.apply(sq.targets_lm) - sq.targets_em_true, axis=1) * 1000
    row["oracle_ratio"] = float(np.median(err) / max(float(np.median(o_err)), 1e-6))
    return row


def point_benchmark(squares_per_tier: int = 30, seed: int = 20240611) -> dict[str, Any]:
    """Run the point-set benchmark over all tiers; return the JSON-ready summary."""
    rng = np.random.default_rng(seed)
    rows_by_tier: dict[str, list[dict[str, Any]]] = {}
    for name, tier in TIERS.items():
        rows = []
        for i in range(squares_per_tier):
            rows.append(_run_square(make_point_square(rng, _spec(rng, tier, i))))
        rows_by_tier[name] = rows
    every = [r for rows in rows_by_tier.values() for r in rows]
    shared6 = [r for r in every if r["shared"] >= 6]
    return {
        "overall": _summary(every),
        "shared_ge_6": _summary(shared6),
        "shared_lt_6": _summary([r for r in every if r["shared"] < 6]),
        "tiers": {k: _summary(v) for k, v in rows_by_tier.items()},
        "models_used": {m: sum(r.get("model") == m for r in every)
                        for m in ("similarity", "affine", "similarity+field",
                                  "affine+field")},
        "ok_with_wrong_pairs": sum(r.get("wrong_pairs", 0) > 0 for r in every),
    }


def image_benchmark(squares_per_tier: int = 25, seed: int = 20240611) -> dict[str, Any]:
    """Bead correlation from simulated fLM and EM images (benchmarks/correlation_images.py)."""
    from correlation_images import image_rows  # heavy simulator imports only when asked

    rows_by_tier = image_rows(squares_per_tier, seed)
    every = [r for rows in rows_by_tier.values() for r in rows]
    return {
        "overall": _summary(every),
        "shared_ge_6": _summary([r for r in every if r["shared"] >= 6]),
        "shared_lt_6": _summary([r for r in every if r["shared"] < 6]),
        "tiers": {k: _summary(v) for k, v in rows_by_tier.items()},
        "detections_median": {
            "lm": float(np.median([r.get("lm_detections", 0) for r in every])),
            "em": float(np.median([r.get("em_detections", 0) for r in every])),
            "shared_beads": float(np.median([r["shared"] for r in every]))},
    }


def main(argv: list[str] | None = None) -> int:
    """Print the benchmark JSON; return 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--squares-per-tier", type=int, default=30)
    ap.add_argument("--image-squares-per-tier", type=int, default=25,
                    help="squares per tier of the image benchmark (0 skips it)")
    ap.add_argument("--atlases", type=int, default=12, help="simulated grids (0 skips them)")
    ap.add_argument("--synthetic-atlases", type=int, default=4,
                    help="grids from tests/protocols/grid_render.py")
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args(argv)
    # stdout carries the one JSON object; the simulators' and detectors' logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    t0 = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "correlation", "seed": args.seed,
                           "points": point_benchmark(args.squares_per_tier, args.seed)}
    if args.image_squares_per_tier > 0:
        out["images"] = image_benchmark(args.image_squares_per_tier, args.seed)
    if args.atlases > 0:
        from correlation_atlas import atlas_benchmark

        out["atlas"] = atlas_benchmark(args.atlases, args.seed, args.synthetic_atlases)
    out["elapsed_s"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
