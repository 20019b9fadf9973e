"""Global placement of mosaic tiles from measured relative positions (weighted least squares).

Why a separate module: the measurements can come from anywhere and at any time. Overlaps of
neighbouring tiles (protocols/stitching.py) give the fine relative placement; matches of
tiles against a lower-magnification overview of the whole area (protocols/em_overview.py)
give absolute constraints that tie together tiles whose overlaps show nothing (a map over
thick cell bodies); an LM atlas registers each tile's overlaps inside the tile's own step, so
the final step only solves and blends.

The model, in the common tile-pixel frame (x and y solved independently with one matrix):

- an overlap edge (i, j) says ``P_j - P_i = m`` (tile j's position minus tile i's);
- an anchor edge (tile k against the overview) says ``P_k - P_o - G l_k = m``: ``P_o`` is
  the overview's own placement error (a stage miss like any tile's, unknown), ``G`` a small
  2 x 2 correction of the overview's calibrated pixel size and rotation (a few tenths of a
  percent and degree on a real column, which over a 90 um square is several hundred nm),
  ``l_k`` the tile's centre relative to the overview's centre. ``G`` has a prior of zero with
  ``reference_linear_sigma``: where overlaps link tiles far apart, they measure it; where they
  do not, the overview is taken at its calibrated scale;
- each row is weighted by sqrt(score) / ``scale`` (``scale``: how much coarser the
  measurement's pixel is than a tile's), so a match at the overview's pixel counts less;
- the gauge of each connected group: the sum of its positions equals the sum of its nominal
  ones (the overview's nominal error is 0), so the mosaic stays in the stage frame without
  favouring any one stage miss;
- the worst edge is dropped and the problem re-solved while any residual exceeds
  ``outlier_px`` times its ``scale`` (a wrong match disagrees with the loops around it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

FloatArray = NDArray[np.float64]

__all__ = ["REFERENCE", "Edge", "EdgeStatus", "Placement", "solve_placement"]

EdgeStatus = Literal["used", "low_score", "ambiguous", "outlier"]

#: ``Edge.i`` of an anchor edge: the overview (reference) node.
REFERENCE = -1


@dataclass(frozen=True)
class Edge:
    """One measured relative position, (x, y) in tile pixels of the common frame.

    Overlap: tile ``j`` relative to tile ``i``. Anchor (``i == REFERENCE``): tile ``j``
    relative to the overview, ``nominal`` being the tile's nominal offset and ``lever`` its
    centre relative to the overview's centre (tile px).
    """

    i: int
    j: int
    nominal: FloatArray
    measured: FloatArray
    ncc: float
    peak_ratio: float
    ambiguous: bool
    status: EdgeStatus
    scale: float = 1.0
    lever: tuple[float, float] = (0.0, 0.0)
    z_score: float = 0.0

    @property
    def is_anchor(self) -> bool:
        return self.i == REFERENCE


@dataclass(frozen=True)
class Placement:
    """The solved positions (n, 2) and what the solve decided.

    ``labels``: connected group of each tile (anchored tiles share the overview's group);
    ``edges``: the input edges with their final status; ``residuals_px``: measured minus
    solved, per edge; ``reference_px``/``reference_linear``: the overview's placement error
    and calibration correction (None without anchors).
    """

    positions: FloatArray
    labels: NDArray[np.int64]
    edges: tuple[Edge, ...]
    residuals_px: tuple[float, ...]
    reference_px: tuple[float, float] | None
    reference_linear: tuple[tuple[float, float], tuple[float, float]] | None


def _solve(offsets: FloatArray, edges: list[Edge], linear_sigma: float
           ) -> tuple[FloatArray, NDArray[np.int64], FloatArray | None, FloatArray | None]:
    n = len(offsets)
    anchored = any(e.is_anchor for e in edges)
    nodes = n + 1 if anchored else n       # node n: the overview
    ref = n
    if edges:
        rows = [ref if e.is_anchor else e.i for e in edges], [e.j for e in edges]
        graph = coo_matrix((np.ones(len(edges)), rows), shape=(nodes, nodes))
        _, labels = connected_components(graph, directed=False)
    else:
        labels = np.arange(nodes)
    n_comp = int(labels.max()) + 1
    n_cols = nodes + (2 if anchored else 0)
    n_rows = len(edges) + n_comp + (2 if anchored else 0)
    a = np.zeros((n_rows, n_cols))
    rhs = np.zeros((n_rows, 2))
    for r, e in enumerate(edges):
        w = np.sqrt(max(e.ncc, 1e-3)) / e.scale
        a[r, e.j] = w
        a[r, ref if e.is_anchor else e.i] = -w
        if e.is_anchor:
            a[r, nodes], a[r, nodes + 1] = -w * e.lever[0], -w * e.lever[1]
        rhs[r] = w * e.measured
    nominal = np.vstack([offsets, np.zeros((1, 2))]) if anchored else offsets
    for c in range(n_comp):
        members = labels == c
        a[len(edges) + c, :nodes][members] = 1.0
        rhs[len(edges) + c] = nominal[members].sum(axis=0)
    if anchored:
        a[-2, nodes] = a[-1, nodes + 1] = 1.0 / linear_sigma
    solution, *_ = np.linalg.lstsq(a, rhs, rcond=None)
    positions = np.asarray(solution[:n], dtype=np.float64)
    if not anchored:
        return positions, np.asarray(labels, dtype=np.int64), None, None
    # columns nodes, nodes + 1 hold (G[0, 0], G[1, 0]) and (G[0, 1], G[1, 1])
    g = np.column_stack([solution[nodes], solution[nodes + 1]])
    return (positions, np.asarray(labels[:n], dtype=np.int64),
            np.asarray(solution[ref], dtype=np.float64), np.asarray(g, dtype=np.float64))


def _residual(e: Edge, positions: FloatArray, ref: FloatArray | None,
              g: FloatArray | None) -> float:
    if e.is_anchor:
        assert ref is not None and g is not None
        model = positions[e.j] - ref - g @ np.asarray(e.lever)
    else:
        model = positions[e.j] - positions[e.i]
    return float(np.hypot(*(model - e.measured)))


def solve_placement(offsets: FloatArray, edges: list[Edge], outlier_px: float,
                    reference_linear_sigma: float = 0.01) -> Placement:
    """Solve, drop the worst edge while its residual exceeds ``outlier_px * scale``, re-solve.

    ``offsets`` (n, 2): nominal tile positions. Edges whose status is not ``used`` take no part
    but get a residual against the final solution. Tiles without any used edge come back at
    their nominal position.
    """
    edges = list(edges)
    while True:
        used = [e for e in edges if e.status == "used"]
        positions, labels, ref, g = _solve(offsets, used, reference_linear_sigma)
        if not used:
            break
        ratios = [_residual(e, positions, ref, g) / (outlier_px * e.scale) for e in used]
        worst = int(np.argmax(ratios))
        if ratios[worst] <= 1.0:
            break
        edges[edges.index(used[worst])] = replace(used[worst], status="outlier")
    linked = np.zeros(len(offsets), bool)
    for e in edges:
        if e.status == "used":
            linked[e.j] = True
            if not e.is_anchor:
                linked[e.i] = True
    positions[~linked] = offsets[~linked]
    residuals = tuple(_residual(e, positions, ref, g) if (not e.is_anchor or ref is not None)
                      else float("nan") for e in edges)
    return Placement(
        positions, labels, tuple(edges), residuals,
        None if ref is None else (float(ref[0]), float(ref[1])),
        None if g is None else ((float(g[0, 0]), float(g[0, 1])),
                                (float(g[1, 0]), float(g[1, 1]))))
