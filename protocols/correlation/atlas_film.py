"""Each square's film transmission with the illumination taken out, from across the bars.

Why: what tells the pose apart on most grids is the film (broken squares brighter, thick
ice and cells darker), and in a stitched light overview the film's differences (a broken
square is ~10% brighter in transmitted light) are smaller than the illumination's:
vignetting repeats in every tile and can dim a tile's corners by a third, tile gains step
by a few percent, the lamp is uneven. Comparing each square's level with its neighbours'
levels, a pitch away, leaves that vignetting in (10-15% spread over ordinary squares on
the independent renderer's overviews, as large as the signal).

Illumination is smooth across a bar even where it is steep across a tile (at a seam both
tiles are at their dim edge), while the film changes from one square to the next. So each
square's log intensity is fitted by a plane (its own illumination slope; cells and dirt
rejected as outliers), the two neighbours' planes are evaluated at the bar between them,
and their difference there is the difference of the two squares' log film transmissions.
Integrating those differences over the lattice (robust least squares, Huber weights for
seams and squares cut by a seam) gives every square's log transmission up to one
constant: on four such overviews the spread over ordinary squares fell from 4-10% to
0.6-2.4% while broken squares stayed 10% above them. Where tiles span only ~2 squares a
seam runs through most squares (a kink a plane cannot follow) and neither way helps (10%
spread either way on one overview; tests/protocols/test_correlation_atlas_film.py): there
the tile mosaic's own flat field is divided out first (atlas_flatfield.py).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import lsqr

from protocols.correlation.atlas_lattice import (
    LatticeCells,
    square_patches,
    window_stack,
)

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

SAMPLES = 13  # per side of the sampled part of each opening
INNER = 0.8  # sampled fraction of the opening's side: clear of the bars' blurred edges
CLIP_SIGMAS = 2.5  # samples further than this from a square's plane are cells or dirt
HUBER = 1.5  # edges off by more than this many robust sigmas are down-weighted
RIDGE = 1e-3  # ties each connected piece of the lattice to zero mean
MIN_AROUND = 3  # measured squares around one that its film is compared with
COVER_SIGMAS = 3.0
COVER_MIN_LOG = 0.04
COVER_LEVEL_PEERS = 9  # squares of similar level whose noise one's is judged by


def _plane_fits(cells: LatticeCells, img: FloatArray, metal_level: float, sign: float
                ) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Each whole opening's log film intensity, sampled and fitted by a plane.

    Returns (rows, cols, 3) planes a + b u + c v (u and v in pitches along the lattice's
    i and j axes), (rows, cols, SAMPLES^2) the log samples and (SAMPLES^2, 3) their
    design rows [1, u, v]; NaN where no whole opening.
    """
    rows, cols = cells.shape
    typical = cells.typical_openness()
    whole = cells.found & cells.valid & (cells.openness > 0.85 * typical)
    out = np.full((rows, cols, 3), np.nan)
    logs = np.full((rows, cols, SAMPLES * SAMPLES), np.nan)
    side = INNER * float(np.sqrt(typical)) if np.isfinite(typical) else 0.0
    s = ((np.arange(SAMPLES) + 0.5) / SAMPLES - 0.5) * side
    ou, ov = np.meshgrid(s, s)
    design = np.c_[np.ones(SAMPLES * SAMPLES), ou.ravel(), ov.ravel()]
    if not whole.any() or not np.isfinite(typical):
        return out, logs, design
    rr, cc = np.nonzero(whole)
    centre = np.full((1, len(rr), 2), np.nan)
    centre[0] = cells.opening_px[rr, cc]
    vals = square_patches(sign * img - metal_level, centre, cells.index_to_px, SAMPLES,
                          side)[0].reshape(len(rr), -1)
    level = np.nanmedian(vals, axis=1)
    good = np.isfinite(vals).all(axis=1) & (level > 0)
    if not good.any():
        return out, logs, design
    y = np.log(np.maximum(vals[good], 0.02 * level[good, None]))
    w = np.ones_like(y)
    coef = np.zeros((len(y), 3))
    for _ in range(3):
        normal = np.einsum("nk,ka,kb->nab", w, design, design)
        rhs = np.einsum("nk,ka,nk->na", w, design, y)
        coef = np.linalg.solve(normal + 1e-9 * np.eye(3), rhs[..., None])[..., 0]
        res = y - coef @ design.T
        sd = 1.4826 * np.median(np.abs(res), axis=1, keepdims=True) + 1e-6
        w = (np.abs(res) < CLIP_SIGMAS * sd).astype(np.float64)
    out[rr[good], cc[good]] = coef
    logs[rr[good], cc[good]] = y
    return out, logs, design


def film_cover(planes: FloatArray, logs: FloatArray, design: FloatArray) -> FloatArray:
    """Fraction of each whole opening's samples that something on the film covers (NaN
    where no whole opening): further from the film's plane than ``COVER_SIGMAS`` times
    the noise of squares as bright (:func:`_noise_at_level`) and than ``COVER_MIN_LOG``.

    Why not the square's own plane fit as it stands: a cell in one corner tilts it towards
    the cell, and a brighter cell, whose contrast is a few noise levels, hides in the
    tilt (and the square's own spread, which the clipping there scales with). So the fit
    is redone from the neighbours' slopes (illumination is smooth over a few squares) and
    the median level, clipping at the noise of squares as bright (:func:`_noise_at_level`):
    it starts beside the film and stays there, yet can still follow a slope of its own (a
    tile seam).
    Why a fraction and not a level: a cell darkens the film in transmitted light and in
    the EM but brightens it in reflected light, and dirt is dark in either; the area
    something covers is what every modality agrees on.
    """
    have = np.isfinite(planes[..., 0])
    cover = np.full(have.shape, np.nan)
    if not have.any():
        return cover
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # squares with no measured neighbour
        slopes = np.stack([np.nanmedian(window_stack(planes[..., k], 1, np.nan), axis=0)
                           for k in (1, 2)], -1)
    around = np.isfinite(window_stack(planes[..., 0], 1, np.nan)).sum(axis=0)
    slopes = np.where((around >= 3)[..., None], slopes, planes[..., 1:])[have]
    y = logs[have]
    flat = y - slopes @ design[:, 1:].T
    coef = np.c_[np.median(flat, axis=1), slopes]
    res = y - coef @ design.T
    noise = 1.4826 * float(np.median(np.abs(res)))
    noise = _noise_at_level(coef[:, 0], res)
    for _ in range(3):
        w = (np.abs(res) < CLIP_SIGMAS * noise[:, None]).astype(np.float64)
        normal = np.einsum("nk,ka,kb->nab", w, design, design)
        rhs = np.einsum("nk,ka,nk->na", w, design, y)
        fit = np.linalg.solve(normal + 1e-9 * np.eye(3), rhs[..., None])[..., 0]
        coef = np.where((w.sum(axis=1) > 0.5 * w.shape[1])[:, None], fit, coef)
        res = y - coef @ design.T
        noise = _noise_at_level(coef[:, 0], res)
    thr = np.maximum(COVER_SIGMAS * noise, COVER_MIN_LOG)
    cover[have] = np.mean(np.abs(res) > thr[:, None], axis=1)
    return cover


def _noise_at_level(level: FloatArray, res: FloatArray) -> FloatArray:
    """Each square's expected noise (log units): the median robust spread of the squares
    nearest to it in level.

    Why by level: in log units shot noise grows as the film darkens, and a thick-ice
    square in the EM (a few % transmission, a few counts) is noisy all over; measured
    against the typical square it would look covered, and the EM's dark squares would
    then meet the LM's cells. Why not the square's own spread: a cell covering a third
    of the square inflates it.
    """
    own = 1.4826 * np.median(np.abs(res), axis=1)
    order = np.argsort(level)
    size = int(min(len(own), max(COVER_LEVEL_PEERS, len(own) // 20)))
    out = np.empty_like(own)
    out[order] = ndimage.median_filter(own[order], size=size, mode="nearest")
    return np.asarray(out, np.float64)


def film_log(planes: FloatArray) -> FloatArray:
    """Log film transmission of every whole opening against the squares around it
    (:func:`_against_surroundings`), from the openings' planes (:func:`_plane_fits`); NaN
    elsewhere (closed, cut, unmeasured squares).
    """
    have = np.isfinite(planes[..., 0])
    out = np.full(have.shape, np.nan)
    n = int(have.sum())
    if n < 2:
        return out
    index = np.full(have.shape, -1)
    index[have] = np.arange(n)
    a_idx, b_idx, diff = [], [], []
    rows, cols = have.shape
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        c0, c1 = max(0, -dc), cols - max(0, dc)
        both = have[:rows - dr, c0:c1] & have[dr:, c0 + dc:c1 + dc]
        ra, ca = np.nonzero(both)
        ca = ca + c0
        # The bars (or the bars' crossing) between the two squares sit half a pitch along
        # u (columns) and v (rows) from each.
        at = np.array([1.0, 0.5 * dc, 0.5 * dr])
        back = np.array([1.0, -0.5 * dc, -0.5 * dr])
        a_idx.append(index[ra, ca])
        b_idx.append(index[ra + dr, ca + dc])
        diff.append(planes[ra, ca] @ at - planes[ra + dr, ca + dc] @ back)
    ia, ib, d = np.concatenate(a_idx), np.concatenate(b_idx), np.concatenate(diff)
    m = len(d)
    if m == 0:
        return out
    w = np.ones(m)
    x = np.zeros(n)
    r_idx = np.r_[np.arange(m), np.arange(m), m + np.arange(n)]
    c_idx = np.r_[ia, ib, np.arange(n)]
    for _ in range(5):
        a = sparse.csr_matrix((np.r_[w, -w, np.full(n, RIDGE)], (r_idx, c_idx)),
                              shape=(m + n, n))
        x = lsqr(a, np.r_[w * d, np.zeros(n)], atol=1e-10, btol=1e-10)[0]
        res = x[ia] - x[ib] - d
        scale = 1.4826 * float(np.median(np.abs(res))) + 1e-6
        w = np.minimum(1.0, HUBER * scale / np.maximum(np.abs(res), 1e-12))
    out[have] = x
    piece = np.zeros(have.shape, np.intp)
    _, labels = connected_components(sparse.coo_matrix((np.ones(m), (ia, ib)), shape=(n, n)),
                                     directed=False)
    piece[have] = labels + 1
    return _against_surroundings(out, piece)


def _against_surroundings(film: FloatArray, piece: NDArray[np.intp]) -> FloatArray:
    """``film`` minus the median of the squares around it (5 x 5) measured in the same
    connected piece (each piece has its own constant); NaN with fewer than ``MIN_AROUND``.

    Why not the integrated value itself: what the integration leaves is a slow random
    walk over the lattice, and a piece cut off by closed squares has an unknown offset.
    """
    around = np.where(window_stack(piece, 2, 0) == piece, window_stack(film, 2, np.nan),
                      np.nan)
    enough = np.isfinite(film) & (np.isfinite(around).sum(axis=0) >= MIN_AROUND)
    out = np.full(film.shape, np.nan)
    out[enough] = film[enough] - np.nanmedian(around[:, enough], axis=0)
    return out


def with_film(cells: LatticeCells, img: FloatArray) -> LatticeCells:
    """``cells`` with :func:`film_log` and :func:`film_cover` measured on ``img``, the
    image ``cells`` were read from (its metal level and sign are theirs)."""
    if not np.isfinite(cells.metal_level):
        return cells
    planes, logs, design = _plane_fits(cells, img, cells.metal_level, cells.metal_sign)
    return replace(cells, film=film_log(planes), cover=film_cover(planes, logs, design))
