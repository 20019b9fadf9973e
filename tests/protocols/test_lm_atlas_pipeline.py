"""The LM atlas computes while the next tile is acquired: what a commit guarantees, that the
overlap really happens, failures of a prefetched tile, determinism, and the atlas assembled
from the files after a restart matching the one assembled while acquiring."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from lm_sim import context, grid_centre, scope, small_grid

from drivers.errors import HardwareFault
from protocols.lm_atlas import LMAtlasParams, LMAtlasPlan
from protocols.ome_tiff import read_ome_tiff
from protocols.plan import MemoryStepStore, Paused, RunControl, StepContext, StepResult, run_plan
from simulators.light import SimulatedLightMicroscope


def _params(spec: Any) -> LMAtlasParams:
    return LMAtlasParams(centre_um=grid_centre(spec), diameter_um=300.0, overlap=0.2,
                         focus_points=3, search_range_um=12.0)


@dataclass
class WatchingStore:
    """A MemoryStepStore that records, at each commit, the clock and whether the files the
    result lists exist (a commit must find them durable)."""

    data_dir: Path
    clock: Any
    inner: MemoryStepStore = field(default_factory=MemoryStepStore)
    at_commit: dict[str, tuple[float, bool]] = field(default_factory=dict)

    def get(self, key: str) -> StepResult | None:
        return self.inner.get(key)

    def put(self, key: str, result: StepResult) -> None:
        files = [self.data_dir / a["path"] for a in result.get("artifacts", [])]
        self.at_commit[key] = (self.clock.now(), all(f.is_file() for f in files))
        self.inner.put(key, result)


def test_a_tile_commits_durable_after_the_next_tile_is_acquired(tmp_path: Path) -> None:
    spec = small_grid(seed=3)
    lm = scope(spec, (256, 256), seed=5)
    store = WatchingStore(tmp_path, lm.clock)
    ctx = StepContext(clock=lm.clock, data_dir=tmp_path, store=store, lm=lm)   # type: ignore[arg-type]
    run_plan(LMAtlasPlan(_params(spec)), ctx)
    keys = ctx.result("lm-atlas/stitch")["tile_keys"]
    assert len(keys) >= 4
    for key, nxt in pairwise(keys):
        committed_at, durable = store.at_commit[key]
        assert durable, key
        assert ctx.result(key)["pairs"] is not None
        # the next tile's frames were taken before this tile's commit: its hardware ran
        # while this tile's overlaps and file were computed
        assert committed_at >= ctx.result(nxt)["frames"][-1]["time_s"]
    assert all(durable for _, durable in store.at_commit.values())
    assert not list((tmp_path / "lm-atlas").glob(".*tmp*"))        # no temporary left


class FailingScope(SimulatedLightMicroscope):
    """Fails once, on its ``fail_at``-th frame (a camera timeout)."""

    fail_at = -1
    frames = 0

    def _do_snap(self, channel: Any, exposure_s: float) -> Any:
        self.frames += 1
        if self.frames == self.fail_at:
            raise HardwareFault("camera timed out")
        return super()._do_snap(channel, exposure_s)


def test_a_failed_prefetch_fails_the_next_tile_not_this_one(tmp_path: Path) -> None:
    spec = small_grid(seed=3)
    ref = scope(spec, (256, 256), seed=5)
    ref_ctx = context(ref, tmp_path / "ref")
    run_plan(LMAtlasPlan(_params(spec)), ref_ctx)
    order = ref_ctx.store.order                          # type: ignore[attr-defined]
    tiles = [k for k in order if "/tile-" in k]
    focus_frames = ref_ctx.result(tiles[0])["frames"][0]["extra"]["frame_id"]

    lm = FailingScope.with_small_camera(spec, shape=(256, 256), seed=5)
    assert isinstance(lm, FailingScope)
    lm.fail_at = focus_frames + 2 * 2 + 1               # first frame of the third tile
    ctx = context(lm, tmp_path / "run")
    plan = LMAtlasPlan(_params(spec))
    started: list[str] = []
    with pytest.raises(HardwareFault, match="camera timed out"):
        run_plan(plan, ctx, on_step_start=lambda s: started.append(s.key))
    assert started[-1] == tiles[2]                       # raised by the tile it belongs to
    assert ctx.store.get(tiles[1]) is not None and ctx.store.get(tiles[2]) is None
    run_plan(plan, ctx, on_step_start=lambda s: started.append(s.key))
    assert ctx.store.order == order                      # type: ignore[attr-defined]
    assert len(started) == len(order) + 1                # only the failed tile ran again


def _atlas(ctx: StepContext) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    stitch = ctx.result("lm-atlas/stitch")
    bf = next(im for im in read_ome_tiff(ctx.data_dir / stitch["path"]) if im.channel == "BF")
    report = json.loads((ctx.data_dir / stitch["report"]).read_text())
    return np.asarray(bf.data), np.array(stitch["pixel_to_stage"]), report


def test_same_seed_same_atlas(tmp_path: Path) -> None:
    spec = small_grid(seed=3)
    runs = []
    for k in range(2):
        lm = scope(spec, (256, 256), seed=5)
        ctx = context(lm, tmp_path / str(k))
        run_plan(LMAtlasPlan(_params(spec)), ctx)
        runs.append(_atlas(ctx))
    (a, fa, ra), (b, fb, rb) = runs
    assert np.array_equal(a, b) and np.array_equal(fa, fb)
    assert ra["tiles"] == rb["tiles"] and ra["assembly"]["incremental"]


def _resample(data: np.ndarray, affine: np.ndarray, to: np.ndarray, shape: tuple[int, int]
              ) -> np.ndarray:
    """``data`` (pixel-to-stage ``affine``) seen through pixel-to-stage ``to``."""
    def full(a: np.ndarray) -> np.ndarray:
        return np.vstack([a, [0.0, 0.0, 1.0]])
    m = (np.linalg.inv(full(affine)) @ full(to))[:2]
    return np.asarray(cv2.warpAffine(data.astype(np.float32), m, shape[::-1],
                                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP))


def test_restart_before_the_stitch_assembles_the_same_atlas_from_files(tmp_path: Path) -> None:
    """A service restarted after the last tile has nothing in memory: the stitch step builds
    the atlas from the tile files, at the final places; it shows what the atlas built while
    acquiring shows (tiles there lie within 0.1 px of their final places)."""
    spec = small_grid(seed=3)
    lm = scope(spec, (256, 256), seed=5)
    live = context(lm, tmp_path / "live")
    run_plan(LMAtlasPlan(_params(spec)), live)
    a, fa, ra = _atlas(live)

    lm2 = scope(spec, (256, 256), seed=5)
    restarted = context(lm2, tmp_path / "restart")
    control = RunControl()
    total = LMAtlasPlan(_params(spec)).total_steps(restarted) or 0
    with pytest.raises(Paused):
        run_plan(LMAtlasPlan(_params(spec)), restarted, control,
                 on_progress=lambda p: control.request_pause() if p.done == total - 1 else None)
    run_plan(LMAtlasPlan(_params(spec)), restarted)      # a fresh plan: nothing in memory
    b, fb, rb = _atlas(restarted)
    assert not rb["assembly"]["incremental"] and ra["assembly"]["incremental"]
    assert ra["tiles"] == rb["tiles"]                    # same overlaps, same solve
    seen = _resample(b, fb, fa, a.shape)
    inner = (slice(40, -40), slice(40, -40))
    covered = (a[inner] > 0) & (seen[inner] > 0)
    diff = np.abs(a[inner] - seen[inner])[covered]
    assert np.median(diff) < 0.01 * float(np.median(a[inner][covered]))
    # the first plan's unfinished atlas file went with the commit of the second's
    assert not list((tmp_path / "restart" / "lm-atlas").glob(".*tmp*"))
