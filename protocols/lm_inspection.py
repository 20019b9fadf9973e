"""Square inspection at 100x: DIC, cell tracker (640) and bead (405) z-stacks, scored.

AutoCLEM step 3 (docs/clem-workflow.md): a square is worth a time-lapse when one or two
well-spread cells have their thin periphery near the square centre and at least 4-5
fiducial beads lie around it, on intact film. The 20x atlas shows the film and roughly where
cells are; beads (200 nm) and the periphery only show at 100x. One step per square
(``lm-inspect/<square key>``): move to the square centre from the atlas affine, find focus
(band-passed DIC, 0.5 um steps: objectives are not parfocal, so the 20x focus is only the
centre of the search), acquire the same z-stack in each channel, write one OME-TIFF, and
measure:

- beads: LoG spots in the 405 maximum projection (protocols/lm_features.py's
  detector), counted inside the field;
- cells: the 640 projection above background; the number of separate cells, the fraction
  of a disc around the square centre covered by cell, and by *thin* cell (the periphery,
  below half the brightest level);
- film: whether the R2/2 hole lattice shows in the in-focus DIC plane (a peak in the
  radial power spectrum at the hole pitch); a torn film has no holes;
- metal: the opaque fraction of a disc of ``metal_radius_um`` around the centre in the
  in-focus DIC plane (the finder grid's centre mark, debris; the finder codes on the bars
  lie outside it). Metal blocks the beam at tilt and hides beads and targets;
- beads around the cell: beads under a cell are seen here but hidden in the EM map by the
  cell's mass, so what a bead correlation can use is the beads off the cell
  (``beads_off_cell``); targets are viruses on and beside the cell, and a correlation
  interpolates only inside the hull of its beads, so ``periphery_in_beads`` is the fraction
  of the thin periphery near the centre (within ``metal_radius_um``) that lies inside the
  hull of the beads off the cell (within ``hull_margin_um``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from drivers.base import Image, LightMicroscope
from protocols.lm_features import (
    beads_off_cell,
    cell_masks,
    detect_spots,
    max_projection,
    outside_hull_um,
)
from protocols.lm_focus import focus_scan
from protocols.lm_io import image_record, save_images
from protocols.plan import StepContext, StepResult

__all__ = ["InspectionParams", "InspectionScores", "film_lattice_ratio", "inspect_square",
           "score_inspection"]

FloatArray = NDArray[np.float64]


class InspectionParams(BaseModel):
    """How each candidate square is imaged and measured at 100x."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    objective: str = Field("100x", min_length=1)
    dic_channel: str = Field("DIC", min_length=1)
    cell_channel: str = Field("640", min_length=1)
    bead_channel: str = Field("405", min_length=1)
    z_range_um: float = Field(4.0, ge=0, le=50)
    z_step_um: float = Field(1.0, gt=0, le=10)
    focus_range_um: float = Field(12.0, gt=0, le=200)
    focus_step_um: float = Field(0.5, gt=0, le=10)
    bead_sigma_um: float = Field(0.1, gt=0)
    bead_threshold_sigmas: float = Field(10.0, gt=0)
    centre_radius_um: float = Field(12.0, gt=0)
    hole_pitch_um: float = Field(4.0, gt=0)
    film_min_ratio: float = Field(4.0, gt=1)
    metal_radius_um: float = Field(35.0, gt=0)
    bead_cell_margin_um: float = Field(1.0, ge=0)
    hull_margin_um: float = Field(5.0, ge=0)


@dataclass(frozen=True)
class InspectionScores:
    """What one square showed at 100x (numbers, not verdicts; the ranking decides)."""

    beads: int
    cells: int
    centre_cell_fraction: float
    centre_periphery_fraction: float
    film_ratio: float
    film_ok: bool
    focus_z_um: float
    metal_fraction: float = 0.0
    beads_off_cell: int = 0
    periphery_in_beads: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def film_lattice_ratio(dic: FloatArray, pixel_um: float, hole_pitch_um: float) -> float:
    """Power at the hole pitch over the power just beside it (radial spectrum, Hann window);
    about 1 without a lattice, >> 1 with one."""
    a = np.asarray(dic, dtype=np.float64)
    h, w = a.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    f = np.abs(np.fft.fftshift(np.fft.fft2((a - a.mean()) * win))) ** 2
    fy = (np.arange(h) - h // 2) / (h * pixel_um)
    fx = (np.arange(w) - w // 2) / (w * pixel_um)
    r = np.hypot(*np.meshgrid(fx, fy))
    f0 = 1.0 / hole_pitch_um
    df = 2.0 / (min(h, w) * pixel_um)
    ring = (np.abs(r - f0) <= df)
    beside = ((np.abs(r - 0.7 * f0) <= df) | (np.abs(r - 1.35 * f0) <= df))
    if not ring.any() or not beside.any():
        return 1.0
    return float(f[ring].max() / max(float(np.median(f[beside])) * 10.0, 1e-30))


def score_inspection(images: Sequence[Image], p: InspectionParams, centre_px: tuple[float, float],
                     focus_z_um: float) -> InspectionScores:
    """Beads, cells, film, metal and beads around the cell from one square's planes (see
    the module docstring)."""
    beads_mip, _, ref = max_projection(images, p.bead_channel)
    px = ref.pixel_size_um
    spots = detect_spots(beads_mip, p.bead_sigma_um / px, p.bead_threshold_sigmas,
                         0.5 / px, edge_margin_px=4)
    cells_mip, _, _ = max_projection(images, p.cell_channel)
    cell, thin = cell_masks(cells_mip, px)
    labels, n = ndimage.label(cell)
    min_area_px = 50.0 / (px * px)
    sizes = ndimage.sum(cell, labels, index=np.arange(1, n + 1)) if n else np.zeros(0)
    n_cells = int(np.sum(np.asarray(sizes) >= min_area_px))
    h, w = cell.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r_um = np.hypot(xx - centre_px[0], yy - centre_px[1]) * px
    disc = r_um <= p.centre_radius_um
    disc_n = max(int(disc.sum()), 1)
    dic = [im for im in images if im.channel == p.dic_channel]
    best = min(dic, key=lambda im: abs((im.z_um or 0.0) - focus_z_um))
    dic_plane = np.asarray(best.data, float)
    ratio = film_lattice_ratio(dic_plane, px, p.hole_pitch_um)
    near = r_um <= p.metal_radius_um
    off = beads_off_cell(spots.xy_px, cell, p.bead_cell_margin_um / px)
    return InspectionScores(beads=len(spots), cells=n_cells,
                            centre_cell_fraction=float((cell & disc).sum() / disc_n),
                            centre_periphery_fraction=float((thin & disc).sum() / disc_n),
                            film_ratio=ratio, film_ok=ratio >= p.film_min_ratio,
                            focus_z_um=focus_z_um,
                            metal_fraction=_metal_fraction(dic_plane, near, px),
                            beads_off_cell=int(off.sum()),
                            periphery_in_beads=_periphery_in_beads(
                                thin & near, spots.xy_px[off], px, p.hull_margin_um))


def _metal_fraction(dic: FloatArray, region: NDArray[np.bool_], pixel_um: float) -> float:
    """Opaque fraction of ``region``: below 30% of the region's median (metal transmits
    ~2%; film and cells > 90%), after smoothing DIC's shading at cell edges."""
    if not region.any():
        return 0.0
    sm = ndimage.gaussian_filter(dic, max(1.0, 0.5 / pixel_um))
    level = 0.3 * float(np.median(sm[region]))
    return float((sm[region] < level).mean())


def _periphery_in_beads(periphery: NDArray[np.bool_], beads_px: FloatArray, pixel_um: float,
                        margin_um: float) -> float:
    """Fraction of the periphery pixels (sampled every ~1 um) inside the beads' hull."""
    step = max(1, round(1.0 / pixel_um))
    rc = np.argwhere(periphery[::step, ::step]) * step
    if len(rc) == 0:
        return 0.0
    out = outside_hull_um(rc[:, ::-1].astype(float), beads_px, pixel_um)
    return float(np.mean(out <= margin_um))


def inspect_square(ctx: StepContext, lm: LightMicroscope, p: InspectionParams, key: str,
                   centre_um: tuple[float, float], focus_hint_um: float | None) -> StepResult:
    """Image one square at 100x, write ``<key>.ome.tif``, return its scores and metadata.

    Moves: objective to ``p.objective``, stage to the square centre, focus drive through the
    focus scan and the z-stack.
    """
    lm.set_objective(p.objective)
    lm.move_xy(*centre_um)
    scan = focus_scan(lm, p.dic_channel, lm.position_z() if focus_hint_um is None
                      else focus_hint_um, p.focus_range_um, p.focus_step_um)
    n_z = round(p.z_range_um / p.z_step_um) + 1
    zs = [scan.z_um + (k - (n_z - 1) / 2) * p.z_step_um for k in range(n_z)]
    images = []
    for c, ch in enumerate((p.dic_channel, p.cell_channel, p.bead_channel)):
        lm.set_channel(ch)
        for k, z in enumerate(zs):
            lm.move_z(z)
            img = lm.snap()
            images.append(img.with_data(img.data, index={"t": 0, "c": c, "z": k}))
    centre_px = images[0].stage_to_pixel_xy(np.asarray(centre_um))
    scores = score_inspection(images, p, (float(centre_px[0]), float(centre_px[1])), scan.z_um)
    rel = f"{key}.ome.tif"
    art = save_images(ctx, rel, images, "lm_inspection", name=key)
    ctx.log.info("lm_inspection.scored", square=key, **scores.as_json())
    return {"path": rel, "artifacts": [art], "centre_um": [centre_um[0], centre_um[1]],
            "scores": scores.as_json(), "focus_peak_ratio": scan.peak_ratio,
            "z_um": zs, "frame": image_record(images[0])}
