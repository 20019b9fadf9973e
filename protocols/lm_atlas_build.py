"""The LM atlas assembled while its tiles are acquired: registered, written, blended.

Why: on the microscope the stage moves, settles and exposes while the computer waits, so
everything a tile needs besides its hardware runs in background threads while the next tile
is acquired (protocols/compute_lane.py), and the last step is left with little to do:

- lane ``io``: a tile's overlaps with the neighbours acquired before it (registered on the raw
  first channel as soon as that frame is in) and its OME-TIFF. These are what the tile's step
  commits, so the step waits for them; the plan acquires the next tile first
  (protocols/lm_atlas.py), and the wait costs nothing while they take less than a tile's
  hardware.
- lane ``blend``: the flat field of each transmitted channel, estimated once the first
  ``flat_field_tiles`` tiles are in (one illumination for all tiles: a few tiles fit its five
  coefficients as well as all of them; the tiles that waited for it are then blended a few per
  tile), and each tile blended into the atlas canvas
  (protocols/mosaic_blend.py ``FeatherCanvas``) at its *provisional* place: the global solve
  over the overlaps measured so far, in a frame where tile 0 stays at its nominal place.

The last step solves once more with every overlap (``finish``). The atlas's origin takes the
median difference between final and provisional places (a common shift moves no pixel); a tile
whose own difference is off that by more than ``REBLEND_PX`` is taken back and blended again
at its final place, so every tile's pixels sit within ``REBLEND_PX`` of the final solve.

Resume: a builder that did not see every tile from the first (the plan was rebuilt after an
interruption) registers and writes as usual, and ``finish`` assembles the whole atlas from the
tile files instead: same flat-field rule, every tile at its final place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import structlog
from numpy.typing import NDArray

from drivers.imaging import Image
from protocols.compute_lane import ComputeLane, Job
from protocols.lm_atlas_place import AtlasPlacement, offsets_px, place_tiles
from protocols.lm_atlas_stitch import register_neighbours
from protocols.lm_flat_field import estimate_flat_field
from protocols.lm_io import load_images, save_images, session_path
from protocols.mosaic_blend import Canvas, FeatherCanvas, plan_canvas
from protocols.mosaic_solve import Edge, solve_placement
from protocols.ome_tiff_stream import OmeTiffStream
from protocols.plan import StepContext
from protocols.stitching import StitchSettings

if TYPE_CHECKING:
    from protocols.lm_atlas import LMAtlasParams

__all__ = ["BLEND_PER_JOB", "REBLEND_PX", "AtlasBuilder", "AtlasProduct"]

log = structlog.get_logger(__name__)
FloatArray = NDArray[np.float64]
#: largest distance (tile px) between where a tile was blended and its final place
REBLEND_PX = 0.1
#: tiles one blend job blends at most (but the last): the tiles that waited for the flat
#: field are blended a few at a time, not in one burst that would compete with registration
BLEND_PER_JOB = 3


@dataclass(frozen=True)
class AtlasProduct:
    """The blended atlas channels (C, H, W) in their not yet committed file, its
    pixel-to-stage affine and the evidence."""

    stream: OmeTiffStream
    planes: NDArray[np.float32]
    pixel_size_um: float
    pixel_to_stage: FloatArray
    placement: AtlasPlacement
    flat_range: dict[str, list[float]]
    assembly: dict[str, Any]
    meta: Any

    def planes_meta(self, frames: list[Image]) -> list[Image]:
        """The atlas planes' final metadata from tile 0's frames (one per channel)."""
        out: list[Image] = self.meta(frames, self.pixel_to_stage)
        return out


class AtlasBuilder:
    """State of one atlas being assembled (see the module docstring); owned by the plan.

    ``planned``: every tile's nominal pixel-to-stage affine from the layout, which fixes the
    canvas before any tile is in; tiles are blended in the frame of ``planned[0]``.
    """

    def __init__(self, ctx: StepContext, p: LMAtlasParams, keys: Sequence[str],
                 planned: Sequence[FloatArray], shape: tuple[int, int], pixel_um: float,
                 transmitted: dict[str, bool]) -> None:
        self.ctx = ctx
        self.p = p
        self.keys = list(keys)
        self.shape = shape
        self.pixel_um = float(pixel_um)
        self.transmitted = transmitted
        self.settings = StitchSettings(max_stage_error_um=p.max_stage_error_um)
        self.reference = np.asarray(planned[0], float)
        self.io = ComputeLane(ctx.clock, "lm-atlas-io")
        self.blend_lane = ComputeLane(ctx.clock, "lm-atlas-blend")
        self.first_index: int | None = None
        self.consumed = False
        self._recent: dict[str, Image] = {}          # io lane: first channels for overlaps
        self._edges: dict[int, list[Edge]] = {}       # io lane writes, blend lane reads
        self._affines: dict[int, FloatArray] = {}     # main thread writes at submit
        self._blend_jobs: list[Job[None]] = []
        self._blend_queued: set[int] = set()
        nominal = offsets_px(planned, self.reference)
        self.factor = self._factor(nominal)
        self.canvas_plan = self._plan_canvas(nominal)
        # blend lane only
        self._canvas: FeatherCanvas | None = None
        self._stream: OmeTiffStream | None = None
        self._field: dict[str, NDArray[np.float32] | None] | None = None
        self._waiting: list[tuple[int, list[Image]]] = []
        self._blended: dict[int, FloatArray] = {}     # where each tile sits on the canvas
        self._shift = np.zeros(2)                      # solve frame minus canvas frame
        self._recent_planes: dict[int, list[Image]] = {}
        self.reblended = 0
        self._keep = 2 * int(math.isqrt(len(self.keys)) + 2) + 2

    # -- geometry -----------------------------------------------------------------------------

    def _factor(self, nominal: FloatArray) -> float:
        """Output pixel over tile pixel: ``atlas_pixel_um`` if set, else 1 if the atlas fits
        ``max_atlas_pixels``, else the smallest pixel that does."""
        if self.p.atlas_pixel_um is not None:
            return float(self.p.atlas_pixel_um / self.pixel_um)
        canvas = plan_canvas(nominal, [self.shape] * len(nominal), 1.0)
        n = canvas.shape[0] * canvas.shape[1]
        return 1.0 if n <= self.p.max_atlas_pixels else float(
            math.sqrt(n / self.p.max_atlas_pixels) * 1.01)

    def _plan_canvas(self, nominal: FloatArray) -> Canvas:
        """The nominal mosaic's canvas widened by twice the stage bound on every side, so that
        every tile's final place (within the bound of nominal, else flagged) is covered."""
        margin = math.ceil(2 * self.p.max_stage_error_um / self.pixel_um) + 2
        c = plan_canvas(nominal, [self.shape] * len(nominal), self.factor)
        extra = math.ceil(2 * margin / self.factor)
        return Canvas((c.origin_px[0] - margin, c.origin_px[1] - margin), c.factor,
                      (c.shape[0] + extra, c.shape[1] + extra))

    @property
    def complete(self) -> bool:
        """True when this builder has seen every tile from the first (no resume between)."""
        return self.first_index == 0 and not self.consumed

    # -- per tile (called on the plan's thread, work queued on the lanes) ---------------------

    def start_tile(self, index: int) -> None:
        if self.first_index is None:
            self.first_index = index

    def register(self, index: int, first: Image, earlier: Sequence[tuple[int, str]]
                 ) -> Job[list[Edge]]:
        """Queue the overlaps of tile ``index`` with the earlier neighbours ``(index, key)``."""
        self._affines[index] = np.asarray(first.pixel_to_stage, float)

        def job() -> list[Edge]:
            neighbours = [(i, self._neighbour(key)) for i, key in earlier]
            edges = register_neighbours(first, index, neighbours, self.p.max_stage_error_um)
            self._edges[index] = edges
            self._recent[self.keys[index]] = first
            while len(self._recent) > self._keep:
                self._recent.pop(next(iter(self._recent)))
            return edges
        return self.io.submit(job, f"register {self.keys[index]}")

    def _neighbour(self, key: str) -> Image:
        img = self._recent.get(key)
        if img is None:     # resumed: the neighbour's step ran in an earlier process
            img = next(im for im in load_images(self.ctx, f"{key}.ome.tif")
                       if im.channel == self.p.channels[0])
        return img

    def write(self, index: int, images: list[Image], **meta: Any) -> Job[dict[str, Any]]:
        """Queue the tile's OME-TIFF; the job returns its artifact record."""
        rel = f"{self.keys[index]}.ome.tif"
        return self.io.submit(lambda: save_images(self.ctx, rel, images, "lm_atlas_tile",
                                                  **meta), f"write {rel}")

    def blend(self, index: int, images: list[Image], registered: Job[list[Edge]]) -> None:
        """Queue the tile's blend (after its overlaps: its provisional place needs them)."""
        if index in self._blend_queued:     # acquired again (its first step failed)
            self.first_index = -1
        if self.first_index != 0:
            return        # resumed mid-atlas or a tile twice: ``finish`` uses the files
        self._blend_queued.add(index)

        def job() -> None:
            registered.result()
            self._waiting.append((index, images))
            if self._field is None:
                needs = self.p.flat_field and any(self.transmitted.get(ch, False)
                                                  for ch in self.p.channels)
                n_ff = min(self.p.flat_field_tiles, len(self.keys)) if needs else 1
                if len(self._waiting) < n_ff and index < len(self.keys) - 1:
                    return
                self._field = self._estimate_field([imgs for _, imgs in self._waiting])
            positions = self._provisional(index)
            self._follow(positions, {k: imgs for k, imgs in self._waiting})
            last = index == len(self.keys) - 1
            now = self._waiting if last else self._waiting[:BLEND_PER_JOB]
            for k, imgs in now:
                self._add(k, imgs, positions[k] - self._shift)
                self._recent_planes[k] = imgs
            self._waiting = [] if last else self._waiting[BLEND_PER_JOB:]
            self._canvas_now(images).settle()
            self._stream_now(images).flush()
            while len(self._recent_planes) > self._keep:
                self._recent_planes.pop(next(iter(self._recent_planes)))
        self._blend_jobs.append(self.blend_lane.submit(job, f"blend {self.keys[index]}"))

    # -- blend lane ---------------------------------------------------------------------------

    def _estimate_field(self, tiles: Sequence[list[Image]]) -> dict[str, NDArray[np.float32] | None]:
        field: dict[str, NDArray[np.float32] | None] = {}
        for c, ch in enumerate(self.p.channels):
            field[ch] = (estimate_flat_field([imgs[c].data for imgs in tiles])
                         if self.p.flat_field and self.transmitted.get(ch, False) else None)
        return field

    def _provisional(self, upto: int) -> FloatArray:
        """Places of tiles 0..upto from the overlaps measured so far, with tile 0 held at
        its nominal place (the solve's gauge moves as tiles are added; a common shift is
        not a blending error, so it is taken out)."""
        offsets = offsets_px([self._affines[k] for k in range(upto + 1)], self.reference)
        edges = [e for j in range(upto + 1) for e in self._edges.get(j, [])]
        positions = solve_placement(offsets, edges, self.settings.outlier_px).positions
        return np.asarray(positions - positions[0] + offsets[0], dtype=np.float64)

    def _add(self, index: int, images: list[Image], at: FloatArray, sign: float = 1.0,
             canvas: FeatherCanvas | None = None) -> None:
        target = canvas or self._canvas_now()
        assert self._field is not None
        planes = {}
        for c, im in enumerate(images):
            f = self._field.get(im.channel or "")
            planes[c] = im.data if f is None else cv2.divide(im.data.astype(np.float32), f)
        target.add_tile(planes, (float(at[0]), float(at[1])), sign)
        if sign > 0 and canvas is None:
            self._blended[index] = np.array(at, dtype=float)

    def _canvas_now(self, template: list[Image] | None = None) -> FeatherCanvas:
        """The canvas, writing into the atlas file (created from ``template``'s metadata)."""
        if self._canvas is None:
            stream = self._stream_now(template)
            self._canvas = FeatherCanvas(self.canvas_plan, len(self.p.channels), stream.planes)
        return self._canvas

    def _stream_now(self, template: list[Image] | None) -> OmeTiffStream:
        if self._stream is None:
            if template is None:
                template = self._load(0)
            self._stream = OmeTiffStream(session_path(self.ctx, self.atlas_path),
                                         self.planes_meta(template, self._canvas_affine(
                                             np.zeros(2))), name="LM atlas")
        return self._stream

    @property
    def atlas_path(self) -> str:
        return f"{self.p.prefix}/atlas.ome.tif"

    def _canvas_affine(self, shift: FloatArray) -> FloatArray:
        """Pixel-to-stage affine of the canvas when the solve frame is the canvas frame plus
        ``shift`` (tile px)."""
        linear, t0 = self.reference[:, :2], self.reference[:, 2]
        origin = np.asarray(self.canvas_plan.origin_px) + shift
        return np.hstack([linear * self.factor, (linear @ origin + t0)[:, None]])

    def planes_meta(self, frames: list[Image], affine: FloatArray) -> list[Image]:
        """The atlas planes' metadata: tile 0's frame of each channel, the atlas geometry."""
        h, w = self.canvas_plan.shape
        return [Image(data=np.broadcast_to(np.float32(0), (h, w)),
                      pixel_size_um=self.pixel_um * self.factor, pixel_to_stage=affine,
                      instrument="lm", stage_um=im.stage_um, time_s=im.time_s,
                      channel=im.channel, objective=im.objective, z_um=im.z_um,
                      exposure_s=im.exposure_s, index={"t": 0, "z": 0}) for im in frames]

    # -- the last step ------------------------------------------------------------------------

    def finish(self, results: Sequence[dict[str, Any]], pairs: Sequence[Edge]) -> AtlasProduct:
        """Solve with every overlap and complete the atlas (on the plan's thread).

        ``results``: the committed tile results in layout order (their nominal affines).
        Raises whatever a queued job raised (the step then fails and is run again, from the
        tile files, since this builder is used up either way).
        """
        self.io.drain()
        self.blend_lane.drain()
        jobs, self._blend_jobs = self._blend_jobs, []
        incremental = self.complete and len(self._blended) + len(self._waiting) == len(
            self.keys) and not self._waiting
        self.consumed = True
        for job in jobs:
            job.result()
        affines = [np.asarray(r["pixel_to_stage"], float) for r in results]
        placement = place_tiles(affines, pairs, self.pixel_um, self.settings,
                                reference=self.reference)
        final = placement.positions
        if incremental:
            shift, lag, again = self._reconcile(final)
        else:
            shift, lag, again = self._assemble_from_files(final), 0.0, len(self.keys)
        planes = self._canvas_now().finish()
        stream = self._stream_now(None)
        self._canvas = self._stream = None
        affine = self._canvas_affine(shift)
        assert self._field is not None
        flat = {ch: [float(v.min()), float(v.max())] for ch, v in self._field.items()
                if v is not None}
        assembly = {"incremental": incremental, "reblended_at_end": again,
                    "reblended_while_acquiring": self.reblended - again if incremental else 0,
                    "max_blend_lag_px": lag, "flat_field_tiles": min(self.p.flat_field_tiles,
                                                                     len(self.keys))}
        log.info("lm_atlas.assembled", **assembly)
        return AtlasProduct(stream, planes, self.pixel_um * self.factor, affine, placement,
                            flat, assembly, self.planes_meta)

    def _follow(self, positions: FloatArray, arriving: dict[int, list[Image]]) -> list[int]:
        """Keep the canvas within ``REBLEND_PX`` of the solve ``positions``: the median move
        of the tiles blended so far becomes the canvas's shift (a common move moves no
        pixel), and a tile that moved otherwise by more is taken back and blended again."""
        done = [k for k in self._blended if k not in arriving]
        if not done:
            return []
        moved = np.array([positions[k] - self._shift - self._blended[k] for k in done])
        self._shift = self._shift + np.median(moved, axis=0)
        again = [k for k in done
                 if np.hypot(*(positions[k] - self._shift - self._blended[k])) > REBLEND_PX]
        for k in again:
            images = self._recent_planes.get(k) or self._load(k)
            self._add(k, images, self._blended[k], sign=-1.0)
            self._add(k, images, positions[k] - self._shift)
        self.reblended += len(again)
        return again

    def _reconcile(self, final: FloatArray) -> tuple[FloatArray, float, int]:
        """Follow the final solve; the atlas's shift, the largest remaining lag and the
        tiles blended again now."""
        again = self._follow(final, {})
        lag = max(float(np.hypot(*(final[k] - self._shift - self._blended[k])))
                  for k in self._blended)
        return self._shift, lag, len(again)

    def _assemble_from_files(self, final: FloatArray) -> FloatArray:
        """The whole atlas from the tile files (after a resume): flat field from the first
        ``flat_field_tiles`` tiles, every tile at its final place."""
        if self._stream is not None:
            self._stream.discard()
        self._canvas = self._stream = None
        n_ff = min(self.p.flat_field_tiles, len(self.keys))
        self._field = self._estimate_field([self._load(k) for k in range(n_ff)])
        for k in range(len(self.keys)):
            self._add(k, self._load(k), final[k], canvas=self._canvas_now())
        return np.zeros(2)

    def _load(self, k: int) -> list[Image]:
        planes = load_images(self.ctx, f"{self.keys[k]}.ome.tif")
        by_name = {im.channel: im for im in planes}
        return [by_name[ch] for ch in self.p.channels]

    def close(self) -> None:
        """End the lanes' threads and remove an atlas file never committed."""
        self.io.close()
        self.blend_lane.close()
        if self._stream is not None:
            self._stream.discard()
            self._stream = None
