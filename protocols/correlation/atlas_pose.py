"""Which of the 8 lattice symmetries and which whole-square shift maps one atlas onto the other.

Why this way (docs/clem-workflow.md, "Atlas registration"): once both atlases are in
square-index space (protocols/correlation/atlas_lattice.py), a hypothesis is one of the 8
symmetries of the square lattice (4 rotations x 2 mirror states) plus an integer shift of
the indices. The bars are the same under every hypothesis, so they are removed: each
square's patch minus the median patch. What is left and decides is non-periodic content
both modalities see as metal: centre mark, finder letters and codes, broken bars.

Two confounds are removed as well, because they agree under *every* rotation about the
grid centre and would otherwise make wrong rotations score almost as well as the right one:

- squares cut by the round mesh boundary (rotationally symmetric arrangement): only squares
  whose neighbours are all inside the mesh take part in the content score;
- per-square patterns that look the same after any symmetry of the square (bar width
  changes from uneven illumination, a square dimmed by ice) and first-order
  "mis-centring" patterns (a gradient across a square): projected out of each patch.

The mesh boundary then fixes the shift: for each symmetry the open-fraction maps of the
two atlases are correlated (partial squares at the rim line up only at the right shift),
and only shifts within one square of that peak are candidates. The answer is the
candidate with the highest content correlation; its margin is *statistical*: the gap to
the next candidate, and its height above the median, in units of the robust spread of the
scores of all hypotheses (all symmetries, all shifts), nearly all of which are wrong. That
makes the threshold independent of how much content a grid happens to have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from protocols.correlation.atlas_lattice import LatticeCells, window_stack

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]
POSES: tuple[tuple[bool, int], ...] = tuple((m, r) for m in (False, True) for r in range(4))

# Rivals whose jackknifed score the best pose must also beat (see _held_rival_level).
HELD_RIVALS = 5


@dataclass(frozen=True)
class Pose:
    """LM square-grid array -> EM square-grid array: mirror columns, rotate, shift.

    The LM array (rows j, columns i) is flipped left-right if ``mirrored``, rotated by
    ``np.rot90(.., rot)``; then LM-transformed cell [r, c] sits on EM cell [r + dr, c + dc].
    """

    mirrored: bool
    rot: int
    dr: int
    dc: int


@dataclass(frozen=True)
class PoseDecision:
    """The best pose, its content correlation and its statistical margin.

    ``z_best``: (best - median of all hypotheses) / robust spread; ``z_gap``: (best -
    runner-up, see :func:`decide_pose`) / the same spread; ``z_held``: the same gap for
    the best's :func:`jackknife_score` (its score without its strongest square).
    ``z_of`` holds every hypothesis' score in the same units, (score - median) / spread,
    so that another channel can be asked about poses this one cannot separate.
    """

    pose: Pose
    score: float
    runner_up: float
    z_best: float
    z_gap: float
    n_hypotheses: int
    n_candidates: int
    mesh_score: float
    z_held: float = 0.0
    z_of: dict[Pose, float] = field(default_factory=dict)


def dihedral(x: NDArray[np.generic], rot: int, mirrored: bool, grid_axes: int = 2
             ) -> NDArray[np.generic]:
    """Apply a lattice symmetry to a grid array (and to its patches if it has 4 axes)."""
    if mirrored:
        x = x[:, ::-1]
    x = np.rot90(x, rot, axes=(0, 1))
    if x.ndim == 4 and grid_axes == 2:
        if mirrored:
            x = x[:, :, :, ::-1]
        x = np.rot90(x, rot, axes=(2, 3))
    return x


def content(cells: LatticeCells) -> tuple[FloatArray, BoolArray]:
    """Residual patches (non-periodic content) and the interior squares they count on."""
    p = cells.patches
    found = cells.found & cells.valid
    template = np.median(p[found], axis=0)
    res = p - template
    k = template.shape[0]
    gy, gx = np.gradient(template)
    yy, xx = np.mgrid[:k, :k] - (k - 1) / 2
    t0 = template - template.mean()
    basis = np.stack([b.ravel() for b in (gx, gy, xx * t0, yy * t0, np.ones((k, k)))], 1)
    flat = res.reshape(res.shape[0], res.shape[1], -1)
    res = (flat - (flat @ np.linalg.pinv(basis).T) @ basis.T).reshape(res.shape)
    sym = np.zeros_like(res)
    for mirrored, rot in POSES:
        sym += np.rot90(res[:, :, :, ::-1] if mirrored else res, rot, axes=(2, 3))
    res = res - sym / len(POSES)
    return res, interior_squares(cells)


def interior_squares(cells: LatticeCells, max_hole_squares: int = 40) -> BoolArray:
    """Squares inside the mesh and not next to its boundary.

    Closed squares that form small clusters enclosed by open ones (thick-ice squares seen
    as metal, an orientation mark, a finder code) are content, not boundary: excluding
    them and their neighbours would throw away exactly the features that decide the pose.
    Large closed regions (the rim, the space around the disc) and closed regions running
    into the image edge (a piece of rim in a partial field) are boundary.
    """
    near = ndimage.binary_dilation(closed_boundary(cells, max_hole_squares),
                                   structure=np.ones((3, 3)))
    return np.asarray(cells.valid & ~near, dtype=bool)


def closed_boundary(cells: LatticeCells, max_hole_squares: int = 40, edge_counts: bool = True
                    ) -> BoolArray:
    """Closed squares of the boundary: clusters larger than ``max_hole_squares`` and, with
    ``edge_counts``, clusters running into the image edge (see interior_squares)."""
    inside = (cells.openness > 0.5 * cells.typical_openness()) & cells.valid
    lab, n = ndimage.label(~inside & cells.valid, structure=np.ones((3, 3)))
    sizes = ndimage.sum(np.ones(lab.shape), lab, np.arange(1, n + 1))
    outer = sizes > max_hole_squares
    if edge_counts and n:
        # A piece of the rim crossing a partial field is small but runs into the image edge.
        edge = ndimage.binary_dilation(~cells.valid, structure=np.ones((3, 3)))
        outer |= ndimage.maximum(edge, lab, np.arange(1, n + 1)) > 0
    return np.asarray(np.isin(lab, 1 + np.flatnonzero(outer)), dtype=bool)


def _masked_ncc(fa: tuple[NDArray[np.complex128], ...], b: FloatArray, mb: FloatArray,
                shape: tuple[int, int]) -> tuple[FloatArray, FloatArray]:
    """Pearson correlation over the overlap of two masked grids, for every shift.

    ``fa`` holds the FFTs (at ``shape``) of A (masked, summed over channels if any), of
    sum(A^2), of A's mask and, per channel, of A itself. ``b`` is (rows, cols[, k, k]).
    Returns (r, n) indexed by cyclic shift; n is the overlap in cells.
    """
    f_a, f_a2, f_ma, f_ach = fa
    bm = b * (mb[..., None, None] if b.ndim == 4 else mb)
    chans = bm.reshape(bm.shape[0], bm.shape[1], -1).transpose(2, 0, 1)
    f_bch = np.fft.rfft2(chans, shape)
    f_b = f_bch.sum(0)
    f_b2 = np.fft.rfft2((chans ** 2).sum(0), shape)
    f_mb = np.fft.rfft2(mb, shape)
    kk = chans.shape[0]

    def cc(x: NDArray[np.complex128], y: NDArray[np.complex128]) -> FloatArray:
        return np.asarray(np.fft.irfft2(x * np.conj(y), shape), np.float64)

    sab = np.asarray(np.fft.irfft2(np.sum(f_ach * np.conj(f_bch), axis=0), shape), np.float64)
    n = cc(f_ma, f_mb) * kk
    n_safe = np.maximum(n, 1.0)
    sa, sb = cc(f_a, f_mb), cc(f_ma, f_b)
    cov = sab - sa * sb / n_safe
    va = cc(f_a2, f_mb) - sa ** 2 / n_safe
    vb = cc(f_ma, f_b2) - sb ** 2 / n_safe
    return cov / np.sqrt(np.maximum(va * vb, 1e-12)), n / kk


def _prepare(a: FloatArray, ma: FloatArray, shape: tuple[int, int]
             ) -> tuple[NDArray[np.complex128], ...]:
    am = a * (ma[..., None, None] if a.ndim == 4 else ma)
    chans = am.reshape(am.shape[0], am.shape[1], -1).transpose(2, 0, 1)
    f_ach = np.fft.rfft2(chans, shape)
    return (f_ach.sum(0), np.fft.rfft2((chans ** 2).sum(0), shape), np.fft.rfft2(ma, shape),
            f_ach)


def _shift_of(idx: tuple[int, int], em_shape: tuple[int, int], shape: tuple[int, int]
              ) -> tuple[int, int]:
    """Signed shift of a cyclic correlation index (positive up to the EM grid's size)."""
    r, c = idx
    return (r if r < em_shape[0] else r - shape[0]), (c if c < em_shape[1] else c - shape[1])


def _mesh_shifts(lm: LatticeCells, em: LatticeCells, shape: tuple[int, int]
                 ) -> tuple[set[Pose], dict[tuple[bool, int], float]]:
    """Poses within one square of each symmetry's best mesh-boundary (openness) match."""
    sup_e = (ndimage.binary_dilation(em.found, iterations=2) & em.valid).astype(np.float64)
    sup_l = (ndimage.binary_dilation(lm.found, iterations=2) & lm.valid).astype(np.float64)
    f_open = _prepare(em.openness, sup_e, shape)
    near: set[Pose] = set()
    peaks: dict[tuple[bool, int], float] = {}
    for mirrored, rot in POSES:
        rb, nb = _masked_ncc(f_open, np.ascontiguousarray(dihedral(lm.openness, rot, mirrored)),
                             np.ascontiguousarray(dihedral(sup_l, rot, mirrored)), shape)
        rb = np.where(nb >= 0.5 * min(sup_e.sum(), sup_l.sum()), rb, -np.inf)
        peak = np.unravel_index(int(np.argmax(rb)), rb.shape)
        peaks[(mirrored, rot)] = float(rb[peak])
        dr0, dc0 = _shift_of((int(peak[0]), int(peak[1])), em.shape, shape)
        near.update(Pose(mirrored, rot, dr0 + a, dc0 + b) for a in (-1, 0, 1) for b in (-1, 0, 1))
    return near, peaks


def _pearson(a: FloatArray, b: FloatArray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt(max(float((a * a).sum() * (b * b).sum()), 1e-24)))


def jackknife_score(res_l: FloatArray, m_l: FloatArray, res_e: FloatArray, m_e: FloatArray,
                    pose: Pose, drop: int = 2, by_overlap: bool = False) -> float:
    """The pose's content correlation with its ``drop`` most contributing squares left out
    one at a time (the lowest of those scores).

    Why: with sparse content (one mark in one atlas) the best of ~2000 hypotheses may owe
    its lead to a single chance coincidence - the mark over one contamination blob or a
    montage seam - and stand far above the rest. A real match is carried by several
    squares (a mark spans several, letters sit in many), so it survives losing any one.
    """
    lr, lc, er, ec = lm_to_em_cells(pose, m_l.shape)
    inside = (er >= 0) & (ec >= 0) & (er < m_e.shape[0]) & (ec < m_e.shape[1])
    lr, lc, er, ec = lr[inside], lc[inside], er[inside], ec[inside]
    both = (m_l[lr, lc] > 0) & (m_e[er, ec] > 0)
    if both.sum() < 3:
        return float("nan")
    moved = dihedral(res_l, pose.rot, pose.mirrored, grid_axes=2)
    tr, tc = np.mgrid[:moved.shape[0], :moved.shape[1]]
    a = moved[tr.ravel()[inside][both], tc.ravel()[inside][both]].reshape(int(both.sum()), -1)
    b = res_e[er[both], ec[both]].reshape(int(both.sum()), -1)
    ac, bc = a - a.mean(), b - b.mean()
    contrib = (ac * bc).sum(axis=1)
    scores = []
    for k in np.argsort(contrib)[::-1][:drop]:
        keep = np.arange(len(a)) != k
        scores.append(_pearson(a[keep], b[keep]) * (np.sqrt(keep.sum()) if by_overlap else 1.0))
    return float(min(scores))


def _held_rival_level(res_l: FloatArray, m_l: FloatArray, res_e: FloatArray,
                      m_e: FloatArray, rivals: list[tuple[float, Pose]],
                      top: int = HELD_RIVALS, by_overlap: bool = False) -> float:
    """Highest score any rival keeps when it, too, loses its most contributing squares.

    The best pose's jackknifed score is compared with its rivals' jackknifed scores, not
    with their full ones: a real grid's broken square can dominate a Pearson correlation
    (a simulated grid's true pose fell from 8.9 to 0.3 sigma above the runner-up's full
    score without it) while a rival owing its score to one coincidence loses it too. Rivals
    beyond the first ``top`` score at most the next one's full score.
    """
    level = rivals[top][0] if len(rivals) > top else float("-inf")
    for score, rival in rivals[:top]:
        held = jackknife_score(res_l, m_l, res_e, m_e, rival, by_overlap=by_overlap)
        level = max(level, min(score, held) if np.isfinite(held) else score)
    return level


def film_contrast(cells: LatticeCells, clip_sigmas: float = 3.0, soft_sigmas: float = 1.0
                  ) -> tuple[FloatArray, BoolArray] | None:
    """Each square's film against the squares around it, in robust sigmas, clipped.

    Why relative to the squares around: illumination, vignetting, tile and montage gain
    steps and ice gradients vary over a few squares and would otherwise correlate with
    anything. Whole openings are read with the illumination taken out (``cells.film``,
    atlas_film.py); closed squares, and openings that could not be read that way, by their
    level against the 8 neighbours' (as a log ratio, the film's units).
    Why in (clipped) sigmas of the atlas' own spread: the two modalities agree on the sign
    of a broken (brighter), thick-ice, cell-covered or closed (darker) square, not on its
    size - a broken square is 10% brighter in transmitted light and twice as bright in the
    EM - so each square votes with at most ``clip_sigmas``. Values within ``soft_sigmas``
    of the median are shrunk to 0 (soft threshold): the many ordinary squares carry only
    noise (vignetting, seams, ice), which would otherwise drown the few that differ.
    Squares partly covered by metal (a centre ring, finder letters, the mesh edge) are left
    to the metal channel: a ring is the same under every rotation about the grid centre
    and would tie the poses the film is there to tell apart. So is the rim as a whole
    (large closed regions are left out), but not a closed cluster at the image edge: an
    orientation mark next to thick-ice squares at the edge of a partial field is exactly
    what decides there.
    """
    b = cells.brightness
    if b is None:
        return None
    ok = np.isfinite(b) & cells.valid
    open_typ = cells.typical_openness()
    # The reference is the open neighbours' film: inside an orientation mark or a patch of
    # closed squares the closed neighbours would make the reference the metal itself.
    neigh = window_stack(np.where(ok & cells.found & (cells.openness > 0.5 * open_typ), b,
                                  np.nan), 1, np.nan)
    counts = np.isfinite(neigh).sum(axis=0)
    ref = np.full(b.shape, np.nan)
    some = counts >= 3
    ref[some] = np.nanmedian(neigh[:, some], axis=0)
    span = ref - cells.metal_level
    typical = float(np.nanmedian(span[ok & some])) if (ok & some).any() else 0.0
    # Whole openings (found: the size of one) or whole closed squares; not the open space
    # beyond the mesh, nor squares cut by a ring, letters or the mesh edge.
    whole = (cells.found & (cells.openness > 0.85 * open_typ)) | \
        (cells.openness < 0.15 * open_typ)
    use = ok & some & whole & (span > 0.25 * typical) & ~closed_boundary(cells, edge_counts=False)
    if typical <= 0 or use.sum() < 10:
        return None
    # In log units, the film's own (below): a closed square (about -1 as a fraction of
    # its neighbours' film) becomes log(0.05), beyond any film difference.
    v = np.zeros(b.shape)
    v[use] = np.log(np.clip(1.0 + (b[use] - ref[use]) / span[use], 0.05, None))
    if cells.film is not None:
        better = use & np.isfinite(cells.film)
        v[better] = cells.film[better]
    z = _votes(v, use, clip_sigmas, soft_sigmas)
    return None if z is None else (z, use)


def cover_contrast(cells: LatticeCells, clip_sigmas: float = 3.0, soft_sigmas: float = 1.0,
                   floor: float = 0.01) -> tuple[FloatArray, BoolArray] | None:
    """Each whole opening's cover (``cells.cover``: the fraction covered by cells or dirt)
    against the atlas' typical square, in robust sigmas (at least ``floor`` of an
    opening), clipped and soft-thresholded as in :func:`film_contrast`.

    Why a channel of its own: cells are the one thing on the film that every modality
    shows, whatever the contrast. A reflected-light overview shows neither broken nor
    thick-ice squares (the film reflects little either way) but does show cells; summed
    with the film level, cells would count once as darker and once as brighter.
    Squares cut by metal are left out, as for the film.
    """
    c = cells.cover
    if c is None:
        return None
    use = np.isfinite(c) & cells.valid & ~closed_boundary(cells, edge_counts=False)
    if use.sum() < 10:
        return None
    z = _votes(c, use, clip_sigmas, soft_sigmas, floor)
    return None if z is None else (z, use)


def _votes(v: FloatArray, use: BoolArray, clip_sigmas: float, soft_sigmas: float,
           floor: float = 0.0) -> FloatArray | None:
    """``v`` in robust sigmas about its median over ``use`` (the spread at least ``floor``),
    clipped at ``clip_sigmas`` and shrunk by ``soft_sigmas`` towards 0; 0 outside ``use``.
    None when the spread is 0."""
    med = float(np.median(v[use]))
    sig = max(1.4826 * float(np.median(np.abs(v[use] - med))), floor)
    if sig <= 0:
        return None
    z = np.clip((np.where(use, v, med) - med) / sig, -clip_sigmas, clip_sigmas)
    z = np.sign(z) * np.maximum(np.abs(z) - soft_sigmas, 0.0)
    return np.where(use, z, 0.0)


def _decide(res_l: FloatArray, m_l: FloatArray, res_e: FloatArray, m_e: FloatArray,
            near: set[Pose], peaks: dict[tuple[bool, int], float], min_overlap: float,
            by_overlap: bool = False) -> PoseDecision:
    """One content channel's best pose and its statistical margin (see decide_pose).

    ``by_overlap``: score r * sqrt(overlapping squares) instead of r. A correlation over
    few squares scatters more by chance; compared raw, the runner-up among thousands of
    hypotheses is a small-overlap one that happens to score high.
    """
    size = max(m_l.shape)
    shape = (m_e.shape[0] + size, m_e.shape[1] + size)
    f_content = _prepare(res_e, m_e, shape)
    need = min_overlap * min(m_e.sum(), m_l.sum())
    scores_all: list[FloatArray] = []
    poses: list[tuple[float, Pose]] = []
    for mirrored, rot in POSES:
        r, n = _masked_ncc(f_content, np.ascontiguousarray(dihedral(res_l, rot, mirrored)),
                           np.ascontiguousarray(dihedral(m_l, rot, mirrored)), shape)
        ok = n >= need
        if by_overlap:
            r = r * np.sqrt(np.maximum(n, 1.0))
        scores_all.append(r[ok])
        rows, cols = np.nonzero(ok)
        for i, j in zip(rows, cols):
            dr, dc = _shift_of((int(i), int(j)), m_e.shape, shape)
            poses.append((float(r[i, j]), Pose(mirrored, rot, dr, dc)))
    scores = np.concatenate(scores_all) if scores_all else np.zeros(0)
    if len(poses) < 2 or scores.size < 10:
        pose = poses[0][1] if poses else Pose(False, 0, 0, 0)
        return PoseDecision(pose, float("nan"), float("nan"), 0.0, 0.0, scores.size,
                            len(poses), float("nan"))
    poses.sort(key=lambda c: -c[0])
    best, pose = poses[0]
    rivals = [c for c in poses[1:] if c[1] in near] if pose in near else poses[1:]
    runner = rivals[0][0] if rivals else poses[1][0]
    med = float(np.median(scores))
    spread = max(1.4826 * float(np.median(np.abs(scores - med))), 1e-9)
    if by_overlap:  # sparse content: many scores near 0, the MAD understates the spread
        spread = max(spread, float(np.std(scores)))
    held = jackknife_score(res_l, m_l, res_e, m_e, pose, by_overlap=by_overlap)
    held_rival = _held_rival_level(res_l, m_l, res_e, m_e, rivals or poses[1:],
                                   by_overlap=by_overlap)
    z_held = (min(best, held) - held_rival) / spread if np.isfinite(held) else 0.0
    return PoseDecision(pose=pose, score=best, runner_up=runner, z_best=(best - med) / spread,
                        z_gap=(best - runner) / spread, z_held=z_held,
                        n_hypotheses=int(scores.size),
                        n_candidates=len(rivals) + 1,
                        mesh_score=peaks[(pose.mirrored, pose.rot)],
                        z_of={p: (sc - med) / spread for sc, p in poses})


def decide_pose(lm: LatticeCells, em: LatticeCells, min_overlap: float = 0.3) -> PoseDecision:
    """Score every (symmetry, shift) hypothesis by metal content and pick the best one.

    ``min_overlap``: a hypothesis counts only if its overlap covers this fraction of the
    smaller atlas' interior squares (tiny overlaps correlate by chance).

    The answer is always the best content score over *all* hypotheses. The mesh boundary
    only narrows the competition: when that best pose is also one the boundary supports,
    the runner-up is taken among the boundary-supported poses (the boundary is then
    independent evidence against the others). When content and boundary disagree - with
    partial fields, a rim seen in one atlas only, or thick-ice squares that look closed -
    the boundary is not trusted and the runner-up is the best of all other hypotheses:
    preselecting by the boundary there turns a wrong boundary peak into a confident
    wrong answer.
    """
    return dict(decide_pose_channels(lm, em, min_overlap))["metal"]


def decide_pose_channels(lm: LatticeCells, em: LatticeCells, min_overlap: float = 0.3
                         ) -> list[tuple[str, PoseDecision]]:
    """The pose decided by each content channel on its own: "metal" (the patches' residual
    metal: marks, letters, bars) and, when both atlases carry film brightness, "film"
    (:func:`film_contrast`) and "cover" (:func:`cover_contrast`). Kept apart rather than
    summed: a channel with nothing to say would halve the margin of one that decides, and
    one channel's large common pattern (a centre ring, equal under every rotation) would
    drown the other's tie-breaking squares.
    """
    size = max(lm.shape)
    near, peaks = _mesh_shifts(lm, em, (em.shape[0] + size, em.shape[1] + size))
    res_e, int_e = content(em)
    res_l, int_l = content(lm)
    out = [("metal", _decide(res_l, int_l.astype(np.float64), res_e, int_e.astype(np.float64),
                             near, peaks, min_overlap))]
    for name, read in (("film", film_contrast), ("cover", cover_contrast)):
        a, b = read(lm), read(em)
        if a is not None and b is not None:
            out.append((name, _decide(a[0], a[1].astype(np.float64), b[0],
                                      b[1].astype(np.float64), near, peaks, min_overlap,
                                      by_overlap=True)))
    return out


def lm_to_em_cells(pose: Pose, lm_shape: tuple[int, int]
                   ) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp],
                              NDArray[np.intp]]:
    """(lm_rows, lm_cols, em_rows, em_cols) of every LM cell under ``pose``."""
    rr, cc = np.mgrid[:lm_shape[0], :lm_shape[1]]
    tr = np.asarray(dihedral(rr, pose.rot, pose.mirrored), np.intp)
    tc = np.asarray(dihedral(cc, pose.rot, pose.mirrored), np.intp)
    er, ec = np.mgrid[:tr.shape[0], :tr.shape[1]]
    return (tr.ravel(), tc.ravel(), np.asarray(er + pose.dr, np.intp).ravel(),
            np.asarray(ec + pose.dc, np.intp).ravel())
