"""Atlas registration: fLM transmitted-light overview of the grid <-> EM low-mag atlas.

Why this way (docs/clem-workflow.md, "Atlas registration"):

- Intensities differ completely between the two, but both see the metal as dark: each
  atlas becomes a dark-metal mask at a common working pixel size, its bar lattice (angle
  mod 90 degrees, pitch) and its square openings, and is resampled into square-index
  space (protocols/correlation/atlas_lattice.py).
- What the lattice cannot tell - 4 rotations x 2 mirror states and the shift by whole
  squares - is decided in index space by non-periodic content, the mesh boundary fixing
  the shift (protocols/correlation/atlas_pose.py). The answer is accepted only when it
  stands out *statistically* from the scores of all other hypotheses (``min_gap_sigmas``,
  ``min_best_sigmas``), which transfers between grids and microscopes far better than a
  hand-set margin on raw correlation values.
- Square openings with the same index under the chosen pose are paired and fitted
  robustly (the transforms module: residuals per square, predicted error at every point).

Pixel (x, y) = (column, row) of each image; no flips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import structlog
from numpy.typing import ArrayLike, NDArray

from protocols.correlation.atlas_closed import decide_closed
from protocols.correlation.atlas_film import with_film
from protocols.correlation.atlas_flatfield import flatten_tiles
from protocols.correlation.atlas_lattice import (
    LatticeCells,
    lattice_cells,
    metal_mask,
    resample,
    with_brightness,
)
from protocols.correlation.atlas_pose import (
    Pose,
    PoseDecision,
    decide_pose_channels,
    lm_to_em_cells,
)
from protocols.correlation.beads_lm import check_image, check_pixel_size
from protocols.correlation.errors import CorrelationInputError
from protocols.correlation.transforms import Transform2D, as_points, fit_transform

FloatArray = NDArray[np.float64]
_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class AtlasConfig:
    """Working resolution and acceptance numbers; lengths in micrometres.

    ``min_gap_sigmas`` / ``min_best_sigmas``: the chosen pose's content correlation must
    exceed the runner-up's by this many robust standard deviations of the score
    distribution over all hypotheses, and their median by ``min_best_sigmas``. Among
    ~1000-3000 hypotheses of unrelated content the best and second best differ by well
    under one such sigma, so 4 leaves a wide safety margin without needing rich content.
    ``min_held_sigmas``: the gap must stay this large with the pose's most contributing
    square left out (atlas_pose.jackknife_score): sparse content in one atlas meeting
    one contamination blob or seam in the other can stand out by many sigmas by chance,
    a real match is carried by several squares.
    ``film_gap_sigmas``: ``min_gap_sigmas`` for the film channel, whose spread is the plain
    standard deviation of its scores (wider than the robust one; sparse content). Over 80
    grids of the independent renderer (benchmarks/correlation_independent_atlas.py, seeds
    2-4) its best pose was wrong 21 times, never more than 1.1 sigma ahead of the next.
    The cover channel (atlas_pose.cover_contrast) keeps ``min_gap_sigmas``: over 159 grids
    of the same renderer (seeds 2-6) its best pose was wrong 117 times, never more than
    1.6 sigma ahead of the next (its right ones reached 5.6; measured before each square's
    noise was judged by its level, which answered no grid wrong on seeds 2-7 either).
    ``tie_gap_sigmas``: the margin one channel needs among the (at most 8) poses another
    channel ties (see _tie_broken); among 8 unrelated poses a lead of 3 sigmas, 3 above
    the median, happens by chance about once in 2000.
    ``closed_*``: the closed-square channel (atlas_closed.py) scores in decades of its
    number of false alarms (NFA): it decides alone at an NFA of 1e-3 that is 100 times less
    than the next different answer's. From an NFA of 1e-2 it may name the few poses within
    ``closed_gap_decades`` of its best (the mark and itself shifted by a square) for another
    channel to choose from (_tie_broken): both going wrong by chance is then ~1e-2 x 1/2000.
    """

    work_pixel_um: float = 2.5
    cell_samples: int = 20
    min_pitch_um: float = 40.0
    max_pitch_um: float = 400.0
    scale_tolerance: float = 0.15
    min_gap_sigmas: float = 4.0
    min_best_sigmas: float = 6.0
    min_held_sigmas: float = 2.0
    tie_gap_sigmas: float = 3.0
    film_gap_sigmas: float = 3.0
    closed_best_decades: float = 3.0
    closed_gap_decades: float = 2.0
    closed_narrow_decades: float = 2.0
    min_squares: int = 12
    max_square_residual_fraction: float = 0.15


@dataclass(frozen=True)
class AtlasResult:
    """Outcome of :func:`register_atlas`.

    ``transform`` maps LM pixel-um (``(col, row) * lm_pixel``) to EM pixel-um; the square
    arrays are matched opening centres in each image's pixels with their residuals (um).
    ``score``/``runner_up`` are the content correlations of the chosen pose and of the best
    other mesh-consistent one; ``confidence`` is their gap in robust sigmas of all
    hypotheses' scores (``z_best``: the best's height above their median).
    ``rotation_deg`` is that of the fitted transform (0 when too few squares paired to fit).
    """

    status: str
    reason: str
    transform: Transform2D | None
    mirrored: bool
    rotation_deg: float
    lm_squares_px: FloatArray
    em_squares_px: FloatArray
    square_residuals_um: FloatArray
    score: float
    runner_up: float
    confidence: float
    z_best: float
    pitch_um: float
    points_em_px: FloatArray | None
    points_error_um: FloatArray | None


def _to_original(xy: FloatArray, shape: tuple[int, ...], work_shape: tuple[int, ...]
                 ) -> FloatArray:
    """Working pixels -> the image's own pixels (cv2.resize maps pixel centres linearly)."""
    fx, fy = shape[1] / work_shape[1], shape[0] / work_shape[0]
    return np.stack([(xy[:, 0] + 0.5) * fx - 0.5, (xy[:, 1] + 0.5) * fy - 0.5], axis=1)


def _paired_openings(lm: LatticeCells, em: LatticeCells, pose: Pose
                     ) -> tuple[FloatArray, FloatArray]:
    """Measured opening centres (working pixels) of the squares the pose pairs."""
    lr, lc, er, ec = lm_to_em_cells(pose, lm.shape)
    inside = (er >= 0) & (ec >= 0) & (er < em.shape[0]) & (ec < em.shape[1])
    lr, lc, er, ec = lr[inside], lc[inside], er[inside], ec[inside]
    both = lm.found[lr, lc] & em.found[er, ec]
    return lm.opening_px[lr[both], lc[both]], em.opening_px[er[both], ec[both]]


def _robust_affine(a_um: FloatArray, b_um: FloatArray, pitch_um: float
                   ) -> tuple[Transform2D, NDArray[np.bool_]]:
    """Affine LM -> EM from paired squares, dropping squares dented by cells or ice."""
    keep = np.ones(len(a_um), bool)
    transform = fit_transform(a_um, b_um, "affine", from_frame="lm_px_um", to_frame="em_px_um")
    for _ in range(3):
        r = np.linalg.norm(transform.apply(a_um) - b_um, axis=1)
        lim = max(3.0 * 1.4826 * float(np.median(r[keep])), 0.02 * pitch_um)
        if np.array_equal(keep, r <= lim):
            break
        keep = r <= lim
        transform = fit_transform(a_um[keep], b_um[keep], "affine", from_frame="lm_px_um",
                                  to_frame="em_px_um")
    return transform, keep


def _rotation_deg(transform: Transform2D) -> float:
    lin = transform.matrix[:, :2]
    if np.linalg.det(lin) < 0:
        lin = lin @ np.diag([-1.0, 1.0])
    return float(np.degrees(np.arctan2(lin[1, 0], lin[0, 0])) % 360.0)


@dataclass(frozen=True)
class _Rule:
    """What one channel's scores must show: ``gap`` over the runner-up, ``best`` above the
    median (for the closed channel: its own significance), ``held`` after the jackknife,
    and the window of its best within which poses tie."""

    gap: float
    best: float
    held: float
    tie: float
    narrow: float


def _rule(name: str, cfg: AtlasConfig) -> _Rule:
    if name == "closed":
        return _Rule(cfg.closed_gap_decades, cfg.closed_best_decades, float("-inf"),
                     cfg.closed_gap_decades, cfg.closed_narrow_decades)
    gap = cfg.film_gap_sigmas if name == "film" else cfg.min_gap_sigmas
    return _Rule(gap, cfg.min_best_sigmas, cfg.min_held_sigmas, cfg.min_gap_sigmas,
                 cfg.min_best_sigmas)


def _unit(name: str) -> str:
    return "decades" if name == "closed" else "sigma"


def _level(name: str) -> str:
    return "chance" if name == "closed" else "the median"


def _doubt(name: str, decision: PoseDecision, cfg: AtlasConfig) -> str | None:
    """Why one channel's pose is not confident, or None when it is."""
    rule = _rule(name, cfg)
    if not (decision.z_gap >= rule.gap and decision.z_best >= rule.best):
        return (f"the best pose is {decision.z_gap:.1f} {_unit(name)} above the next "
                f"candidate (need {rule.gap:g}) and {decision.z_best:.1f} above "
                f"{_level(name)} (need {rule.best:g})")
    if decision.z_held < rule.held:
        return (f"the best pose rests on one square: without it it is "
                f"{decision.z_held:.1f} sigma above the next candidate "
                f"(need {rule.held:g})")
    return None


def _choose_pose(channels: list[tuple[str, PoseDecision]], cfg: AtlasConfig
                 ) -> tuple[str, str, PoseDecision]:
    """(status, reason, decision): a pose some channel is confident of and no confident
    channel contradicts.

    Each channel's margin is already a statistical one over all hypotheses, so one
    confident channel suffices; two confident channels naming different poses mean one of
    them met a chance pattern, and which one cannot be told.
    """
    doubts = {name: _doubt(name, d, cfg) for name, d in channels}
    sure = [(name, d) for name, d in channels if doubts[name] is None]
    if not sure:
        settled = _tie_broken(channels, cfg) or _corroborated(channels, cfg)
        if settled is not None:
            return settled
        name, decision = max(channels, key=lambda c: c[1].z_gap)
        why = "; ".join(f"{n}: {doubts[n]}" for n, _ in channels)
        return "no_confident_match", f"ambiguous: {why}", decision
    name, decision = max(sure, key=lambda c: c[1].z_gap)
    others = [n for n, d in sure if d.pose != decision.pose]
    if others:
        return "no_confident_match", (
            f"ambiguous: the {name} and {others[0]} content each single out a different "
            "pose"), decision
    return "ok", (
        f"pose {decision.z_gap:.1f} sigma above the next candidate and {decision.z_best:.1f} "
        f"sigma above the median of {decision.n_hypotheses} hypotheses ({name} content)"
    ), decision


def _within(name: str, decision: PoseDecision, tied: list[Pose]
            ) -> tuple[Pose, Pose, float, float] | None:
    """(top, second, lead, top's level) of one channel's scores among the tied poses.

    The closed-square channel's scores are -log10 of a number of false alarms among all
    its hypotheses; among the tied few only, that number shrinks by their ratio.
    """
    if not all(p in decision.z_of for p in tied):
        return None
    ranked = sorted(tied, key=lambda p: -decision.z_of[p])
    fewer = np.log10(decision.n_hypotheses / len(tied)) if name == "closed" else 0.0
    top, second = decision.z_of[ranked[0]] + fewer, decision.z_of[ranked[1]] + fewer
    return ranked[0], ranked[1], top - second, top


def _half_sure(name: str, lead: float, top: float, cfg: AtlasConfig) -> bool:
    """Half the margin a judge needs alone (see _tie_broken)."""
    if name == "closed":
        return lead >= 0.5 * cfg.closed_gap_decades and top >= 0.5 * cfg.closed_best_decades
    return lead >= 0.5 * cfg.tie_gap_sigmas and top >= 0.5 * cfg.tie_gap_sigmas


def _tie_broken(channels: list[tuple[str, PoseDecision]], cfg: AtlasConfig
                ) -> tuple[str, str, PoseDecision] | None:
    """A pose one channel singles out among the few another channel cannot separate.

    Why: a centre ring (or the round mesh edge) makes the metal channel stand far above
    all hypotheses but tie the rotations about the grid centre; the film channel may be
    too weak to stand out among all ~3000 hypotheses yet clearly prefer one of those few.
    The first channel must be sure that the answer is among its tied poses (``z_best``)
    and the tie must be small (at most the 8 lattice symmetries); the second must then
    beat every other tied pose by ``tie_gap_sigmas`` of its own spread, and stand as far
    above its own median.

    Or two channels each half as sure name the same pose and none names another: among 8
    unrelated poses a lead of 1.5 sigma, 1.5 above the median, happens about once in 20,
    and the second naming the same pose by chance once in 8 x 20 - together about as rare
    as one lead of 3. The tying channel's own order among its tied poses counts here only
    for closed squares, where it is real evidence (the mark with all its hits against
    itself shifted by a square); the metal's order within its tie is its noise.
    """
    for name, narrow in channels:
        rule = _rule(name, cfg)
        if narrow.z_best < rule.narrow:
            continue
        tied = [p for p, z in narrow.z_of.items() if z >= narrow.z_best - rule.tie]
        if not 2 <= len(tied) <= 8:
            continue
        verdicts = {other: _within(other, judge, tied) for other, judge in channels}
        for other, v in verdicts.items():
            if other == name or v is None:
                continue
            pose, second, lead, top = v
            if lead >= cfg.tie_gap_sigmas and top >= cfg.tie_gap_sigmas:
                return "ok", (
                    f"the {name} content ties {len(tied)} poses {narrow.z_best:.1f} "
                    f"{_unit(name)} above {_level(name)}; the {other} content puts one "
                    f"{lead:.1f} {_unit(other)} above the others"), \
                    _tie_decision(narrow, tied, pose, second, lead)
        half = {o: v for o, v in verdicts.items() if v is not None and (o != name or o == "closed")
                and _half_sure(o, v[2], v[3], cfg)}
        named = {v[0] for v in half.values()}
        if len(half) >= 2 and len(named) == 1:
            pose = named.pop()
            lead = min(v[2] for v in half.values())
            second = next(iter(half.values()))[1]
            how = ", ".join(f"{o} {v[2]:.1f} {_unit(o)}" for o, v in half.items())
            return "ok", (
                f"the {name} content ties {len(tied)} poses {narrow.z_best:.1f} "
                f"{_unit(name)} above {_level(name)}; {len(half)} channels put the same one "
                f"above the others ({how})"), _tie_decision(narrow, tied, pose, second, lead)
    return None


def _corroborated(channels: list[tuple[str, PoseDecision]], cfg: AtlasConfig
                  ) -> tuple[str, str, PoseDecision] | None:
    """A pose two channels each put first among all their ~1000-7000 hypotheses.

    Why: a channel may single out the right pose and still be refused alone - the metal of a
    finder letter that only one square of a small EM field shows (the jackknife cannot tell
    it from a coincidence), film whose best stands only 1-2 sigma above the next. Two
    channels read different things (metal; film level; cover; closed squares), so their
    first choices coincide by chance about once in the number of hypotheses (~1/2000).
    Over 120 grids of the independent renderer (benchmarks/correlation_independent_atlas.py,
    seeds 2-5) two channels' first choices coincided 77 times, every time on the right
    pose. Each must still stand above its own median (``tie_gap_sigmas``, or half
    ``closed_best_decades`` for the closed squares): a flat channel's first choice is
    arbitrary. A third channel standing up for another pose vetoes the answer, but only
    when its own best also leads its runner-up by half the gap it needs alone: standing
    is no evidence by itself (the best of ~2000 unrelated hypotheses stands ~3.5 sigma
    above their median).
    """

    def standing(name: str, decision: PoseDecision) -> bool:
        floor = 0.5 * cfg.closed_best_decades if name == "closed" else cfg.tie_gap_sigmas
        return decision.z_best >= floor

    def contradicts(name: str, decision: PoseDecision, pose: Pose) -> bool:
        # A third channel standing up for another pose contradicts, unless the pose is
        # among those it ties with its best (a centre ring ties the rotations) or its own
        # best does not stand out from its runner-up by half the gap it needs alone: the
        # best of ~2000 hypotheses of a channel that sees nothing stands ~3.5 sigma above
        # the median (as high as ``standing`` asks) but only a few tenths above the next.
        # Over 159 independent grids (seeds 2-6) the cover's wrong first choices stood a
        # median 3.7 above the median and 0.2 (90th percentile 0.7, at most 1.6) above the
        # next; they vetoed grid 1686227695's right answer (metal and film agreeing).
        # Nor when its best rests on one square (the jackknife, z_held): grid 130025050's
        # metal stood 38 sigma ahead on one square and -18 without it, and vetoed the pose
        # the closed squares and the cover both put first.
        rule = _rule(name, cfg)
        return (decision.pose != pose and decision.z_gap >= 0.5 * rule.gap
                and decision.z_held >= 0.5 * rule.held
                and decision.z_of.get(pose, float("-inf")) < decision.z_best - rule.tie)

    up = [(name, d) for name, d in channels if standing(name, d)]
    for i, (name, first) in enumerate(up):
        if any(contradicts(n, d, first.pose) for n, d in up):
            continue
        for other, second in up[i + 1:]:
            if second.pose == first.pose:
                return "ok", (
                    f"the {name} and {other} content put the same pose first "
                    f"({first.z_best:.1f} {_unit(name)} and {second.z_best:.1f} "
                    f"{_unit(other)} above {_level(name)} and {_level(other)})"), first
    return None


def _tie_decision(narrow: PoseDecision, tied: list[Pose], pose: Pose, second: Pose,
                  lead: float) -> PoseDecision:
    # Scores here are the tying channel's, in its units (its raw ones tie).
    return PoseDecision(pose=pose, score=narrow.z_of[pose], runner_up=narrow.z_of[second],
                        z_best=narrow.z_of[pose], z_gap=lead, n_hypotheses=len(tied),
                        n_candidates=len(tied), mesh_score=narrow.mesh_score, z_held=lead)


def register_atlas(lm_image: ArrayLike, lm_pixel_um: float, em_image: ArrayLike,
                   em_pixel_um: float, points_lm_px: ArrayLike | None = None,
                   config: AtlasConfig | None = None) -> AtlasResult:
    """Register the LM grid overview to the EM atlas; map LM pixel points to EM pixels.

    Raises CorrelationInputError for unusable images or pixel sizes, or when no grid
    lattice is visible or the pitches disagree beyond ``scale_tolerance``; an ambiguous
    registration is a result ("no_confident_match").
    """
    cfg = config or AtlasConfig()
    lm_px = check_pixel_size(lm_pixel_um, "LM atlas")
    em_px = check_pixel_size(em_pixel_um, "EM atlas")
    lm = check_image(lm_image, "LM atlas")
    em = check_image(em_image, "EM atlas")
    pts = np.zeros((0, 2)) if points_lm_px is None else as_points(points_lm_px, "points", 0)
    work = cfg.work_pixel_um
    lm_w, em_w = resample(lm, lm_px, work), resample(em, em_px, work)
    cells = []
    for name, img in (("LM atlas", lm_w), ("EM atlas", em_w)):
        try:
            mask = metal_mask(img, work, cfg.min_pitch_um, cfg.max_pitch_um)
            found = lattice_cells(mask, work, cfg.cell_samples, cfg.min_pitch_um,
                                  cfg.max_pitch_um, cfg.min_squares)
            flat = flatten_tiles(img, mask, found.pitch_um / work)
            cells.append(with_film(with_brightness(found, flat, mask), flat))
        except CorrelationInputError as err:
            raise CorrelationInputError(f"{name}: {err}") from err
    lm_cells, em_cells = cells
    scale = em_cells.pitch_um / lm_cells.pitch_um
    if abs(scale - 1.0) > cfg.scale_tolerance:
        raise CorrelationInputError(
            f"grid pitch {lm_cells.pitch_um:.1f} um in LM vs {em_cells.pitch_um:.1f} um in EM: "
            f"pixel sizes off by more than {cfg.scale_tolerance:.0%} or no grid lattice visible")
    channels = decide_pose_channels(lm_cells, em_cells)
    closed = decide_closed(lm_cells, em_cells)
    if closed is not None:
        channels.append(("closed", closed))
    status, reason, decision = _choose_pose(channels, cfg)
    pairs_lm, pairs_em = _paired_openings(lm_cells, em_cells, decision.pose)
    lm_sq_px = _to_original(pairs_lm, lm.shape, lm_w.shape)
    em_sq_px = _to_original(pairs_em, em.shape, em_w.shape)
    p_em = em_cells.pitch_um
    if status == "ok":
        reason = f"{len(pairs_lm)} squares matched; {reason}"
    if status == "ok" and len(pairs_lm) < cfg.min_squares:
        status, reason = "no_confident_match", (f"{len(pairs_lm)} squares matched, need "
                                                f"{cfg.min_squares}")
    transform, resid, mirrored, rotation = None, np.zeros(0), decision.pose.mirrored, 0.0
    if len(pairs_lm) >= 4:
        transform, keep = _robust_affine(lm_sq_px * lm_px, em_sq_px * em_px, p_em)
        lm_sq_px, em_sq_px = lm_sq_px[keep], em_sq_px[keep]
        resid = np.linalg.norm(transform.apply(lm_sq_px * lm_px) - em_sq_px * em_px, axis=1)
        mirrored, rotation = transform.mirrored, _rotation_deg(transform)
        if status == "ok" and float(np.median(resid)) > cfg.max_square_residual_fraction * p_em:
            status, reason = "no_confident_match", (
                f"square centres do not agree: median residual {np.median(resid):.1f} um")
    pts_em = pts_err = None
    if transform is not None:
        pts_em = transform.apply(pts * lm_px) / em_px if len(pts) else np.zeros((0, 2))
        pts_err = transform.predicted_error(pts * lm_px) if len(pts) else np.zeros(0)
    _log.info("atlas.registered", status=status, squares=len(lm_sq_px),
              z_gap=round(decision.z_gap, 2), z_best=round(decision.z_best, 2),
              mirrored=mirrored, rotation_deg=round(rotation, 2))
    return AtlasResult(status=status, reason=reason, transform=transform, mirrored=mirrored,
                       rotation_deg=rotation, lm_squares_px=lm_sq_px, em_squares_px=em_sq_px,
                       square_residuals_um=resid, score=decision.score,
                       runner_up=decision.runner_up, confidence=decision.z_gap,
                       z_best=decision.z_best, pitch_um=p_em, points_em_px=pts_em,
                       points_error_um=pts_err)
