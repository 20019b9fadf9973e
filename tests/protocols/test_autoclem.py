"""The whole AutoCLEM session on the simulators (issue 7): LM atlas to report, in one plan.

One session runs to just before its first tilt series (module fixture); from there it is
finished twice: as it is, and with the service killed right after the first tilt of the
first target and restarted with fresh plan and instrument objects. Asserted against the
simulators' truth: every collected target's 0-degree record is centred within 150 nm of
the virus it came from, the files re-open, the report is written with its figures, and the
restart repeats no tilt.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import mrcfile
import numpy as np
import pytest
from session_sim import World, params, specimen, world
from test_report_browser import screenshot

from daemon.sim_truth import match_target, record_centre_true_um
from drivers.base import InvalidState
from drivers.serialem.navigator import read as read_nav
from protocols.autoclem import CHECKPOINT_KEY, REPORT_KEY, AutoCLEMPlan
from protocols.autoclem_params import AutoCLEMParams
from protocols.mdoc import read_mdoc
from protocols.ome_tiff import read_ome_tiff
from protocols.plan import (
    CheckpointWaiting,
    MemoryStepStore,
    RunControl,
    Step,
    StepContext,
    StepResult,
    run_plan,
)
from simulators.electron import SimulatedElectronMicroscope
from simulators.specimen import Specimen

pytestmark = pytest.mark.slow
SEED = 3
MAX_MISS_NM = 150.0


class StopBefore(Exception):
    """Raised by the step-start hook: the run stops before a step with this prefix."""


class Killed(Exception):
    """The service 'dies' right after a commit."""


@dataclass
class Base:
    """The session up to its first tilt series: folder, journal and setup."""

    spec: Specimen
    params: AutoCLEMParams
    folder: Path
    results: list[tuple[str, StepResult]]
    world: World
    checkpoint_waited: bool

    def store(self) -> MemoryStepStore:
        store = MemoryStepStore()
        for key, result in self.results:
            store.put(key, result)
        return store

    def copy_to(self, folder: Path) -> Path:
        shutil.copytree(self.folder, folder)
        return folder


def _stop_at_first_target(step: Step) -> None:
    if step.key.startswith("target-"):
        raise StopBefore(step.key)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    spec = specimen(SEED)
    p = params(spec)
    folder = tmp_path_factory.mktemp("autoclem") / "session"
    folder.mkdir()
    w = world(spec)
    store = MemoryStepStore()
    ctx = w.context(folder, store)
    control = RunControl()
    waited = False
    try:
        run_plan(AutoCLEMPlan(p), ctx, control)
    except CheckpointWaiting as err:
        waited = err.key == CHECKPOINT_KEY
    control.confirmed.add(CHECKPOINT_KEY)
    with pytest.raises(StopBefore):
        run_plan(AutoCLEMPlan(p), ctx, control, on_step_start=_stop_at_first_target)
    results = [(k, r) for k in store.order if (r := store.get(k)) is not None]
    return Base(spec, p, folder, results, w, waited)


def _run(plan_params: AutoCLEMParams, ctx: StepContext, started: list[str]) -> None:
    control = RunControl()
    control.confirmed.add(CHECKPOINT_KEY)
    run_plan(AutoCLEMPlan(plan_params), ctx, control, on_step_start=lambda s: started.append(
        s.key))


@dataclass
class Finished:
    params: AutoCLEMParams
    ctx: StepContext
    folder: Path
    ems: list[SimulatedElectronMicroscope]
    started: list[str]


@pytest.fixture(scope="module")
def finished(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """The session finished by the same service that started it."""
    folder = base.copy_to(tmp_path_factory.mktemp("finished") / "session")
    ctx = base.world.context(folder, base.store())
    started: list[str] = []
    _run(base.params, ctx, started)
    return Finished(base.params, ctx, folder, [base.world.em], started)


def _reached_nm(base: Base, ems: list[SimulatedElectronMicroscope], ctx: StepContext,
                target_id: str, record: dict[str, Any]) -> tuple[float, Any]:
    """Miss (nm) of the 0-degree record's centre from the target's virus, true positions
    (the virus found through the LM simulator's true pose of the target's frame)."""
    fixed = {t["id"]: t for t in ctx.result(CHECKPOINT_KEY)["targets"]}
    match, how = match_target(base.spec, fixed[target_id], (base.world.lm,))
    assert how == "frame"
    assert match.distance_um < 0.5 and match.runner_up_um > 2 * match.distance_um, (
        f"target {target_id} matches no single virus: {match}")
    for em in ems:      # the simulator that took the frame (before or after a restart)
        try:
            reached = record_centre_true_um(em, record)
        except InvalidState:
            continue
        return float(np.hypot(*(reached - match.em_stage_um)) * 1e3), match
    raise AssertionError(f"no simulator took {record['path']}")


def base_params_angles(run: Finished) -> tuple[float, ...]:
    angles: tuple[float, ...] = run.params.tilt_scheme.to_scheme().angles()
    return angles


def _collected(ctx: StepContext) -> list[dict[str, Any]]:
    return [t for t in ctx.result(REPORT_KEY)["targets"] if t["status"] == "collected"]


def _zero_record(ctx: StepContext, target_id: str) -> dict[str, Any]:
    record: dict[str, Any] = ctx.result(f"target-{target_id}/tilt/+00.0")["record"]
    return record


def test_lm_phase_waits_for_the_operator_and_finds_targets(base: Base) -> None:
    keys = [k for k, _ in base.results]
    assert base.checkpoint_waited
    for needed in ("lm-atlas/stitch", "squares/select", "timelapse/p1/final",
                   "timelapse/summary", "targets/p0", "targets/p1", CHECKPOINT_KEY,
                   "em-atlas/stitch", "correlate/atlas", "targets/transfer"):
        assert needed in keys, needed
    assert keys.index("targets/p1") < keys.index(CHECKPOINT_KEY) < keys.index("em-atlas/stitch")
    fixed = dict(base.results)[CHECKPOINT_KEY]["targets"]
    assert 0 < len(fixed) <= 2 * base.params.max_targets_per_square
    squares = dict(base.results)["correlate/atlas"]["squares"]
    assert [s["status"] for s in squares] == ["ok", "ok"]


def test_every_target_is_reached_within_150nm(base: Base, finished: Finished) -> None:
    transfer = finished.ctx.result("targets/transfer")["targets"]
    moved = [t for t in transfer if t["status"] == "transferred"]
    collected = _collected(finished.ctx)
    assert len(collected) >= 2 and {t["id"] for t in collected} == {t["id"] for t in moved}
    misses = {}
    for t in moved:
        miss, _ = _reached_nm(base, finished.ems, finished.ctx, t["id"],
                              _zero_record(finished.ctx, t["id"]))
        misses[t["id"]] = round(miss)
    print(f"miss per target (nm): {misses}")
    assert max(misses.values()) < MAX_MISS_NM, misses


def test_files_reopen_and_the_report_shows_them(finished: Finished) -> None:
    folder, ctx = finished.folder, finished.ctx
    atlas = read_ome_tiff(folder / ctx.result("lm-atlas/stitch")["path"])
    assert [im.channel for im in atlas] == ["BF", "DIC"]
    final = read_ome_tiff(folder / ctx.result("timelapse/p0/final")["path"])
    assert {im.channel for im in final} == {"488", "640", "405"}
    for key in ("em-atlas/stitch", *(f"square-{s['id']}/map/stitch"
                                     for s in ctx.result("correlate/atlas")["squares"])):
        res = ctx.result(key)
        with mrcfile.open(folder / res["mrc"]) as mrc:
            assert mrc.data.shape == tuple(res["shape"])
    n_tilts = len(base_params_angles(finished))
    for t in _collected(ctx):
        with mrcfile.open(folder / t["tilt_series"]) as mrc:
            assert mrc.data.shape[0] == n_tilts == t["n_tilts"]
        stack = ctx.result(f"target-{t['id']}/stack")
        _, records = read_mdoc(folder / stack["mdoc"])
        assert sorted(r.tilt_deg for r in records) == [-6.0, -3.0, 0.0, 3.0, 6.0]
    nav = read_nav(folder / ctx.result("em-navigator/write")["nav"])
    labels = {item.label for item in nav.items}
    assert {t["id"] for t in _collected(ctx)} <= labels
    report = ctx.result(REPORT_KEY)
    page = folder / report["html"]
    parser = _Images()
    parser.feed(page.read_text())
    assert len(parser.srcs) >= 6         # two atlases, beads and targets for each square
    for src in parser.srcs:
        picture = cv2.imread(str(page.parent / src))
        assert picture is not None and picture.size > 0, src
    text = page.read_text()
    for needle in ("atlas correlation", "600", "true error", *(t["id"] for t in report[
            "targets"])):
        assert needle in text, needle
    assert all(t["true_error_nm"] is not None for t in _collected(ctx))
    stages = {t["stage"] for t in report["timings"]}
    assert {"LM atlas", "atlas correlation", "bead correlation and target transfer",
            "realign and tilt series"} <= stages
    saved = json.loads((folder / "targets" / "transfer.json").read_text())
    assert [t["id"] for t in saved["targets"]] == [t["id"] for t in report["targets"]]


def test_report_in_a_real_browser(finished: Finished, tmp_path: Path) -> None:
    """The page as an operator sees it (Debian's chromium, headless): text and tables, and
    every figure loaded, recognised by the colours only the figures use."""
    page = finished.folder / finished.ctx.result(REPORT_KEY)["html"]
    shot = screenshot(page, tmp_path / "report.png", tmp_path / "profile", size=(1300, 9000))
    picture = cv2.imread(str(shot))
    assert picture is not None and picture.shape[:2] == (9000, 1300)
    used = picture[: _last_content_row(picture) + 1]
    assert used.shape[0] > 4000                        # tables and six or more figures
    assert (used.min(axis=2) < 100).mean() > 0.05      # micrographs and text, not a blank page
    b, g, r = (used[..., k].astype(int) for k in range(3))
    colours = {"green square boxes": (g > 170) & (r < 110) & (b < 110),
               "yellow bead pairs": (r > 200) & (g > 170) & (b < 80),
               "cyan beads": (b > 200) & (g > 170) & (r < 60),
               "magenta targets": (b > 180) & (r > 180) & (g < 110)}
    for what, mask in colours.items():
        assert mask.sum() > 200, what
    assert (page.parent / "lm_atlas.png").stat().st_size > 10_000


def _last_content_row(picture: np.ndarray) -> int:
    """The page's last row that is not plain background."""
    rows = np.nonzero((picture.min(axis=2) < 240).any(axis=1))[0]
    return int(rows[-1]) if len(rows) else 0


def test_total_steps_is_an_estimate_that_becomes_exact(base: Base, finished: Finished) -> None:
    """Before anything ran the total comes from the params; once every decision is committed
    it is the number of steps the plan yields (progress bars reach 100%)."""
    plan = AutoCLEMPlan(finished.params)
    ran = len(finished.ctx.store.order)          # every step of the session, committed
    assert plan.total_steps(finished.ctx) == ran
    fresh = StepContext(clock=base.world.clock, data_dir=finished.folder,
                        store=MemoryStepStore(), lm=base.world.lm, em=base.world.em)
    first = plan.total_steps(fresh)
    assert first is not None and 0.6 * ran <= first <= 1.6 * ran, (first, ran)


def test_killed_in_the_em_phase_and_restarted_repeats_no_tilt(base: Base,
                                                              tmp_path: Path) -> None:
    """Killed right after the first tilt of the first target is committed; the restarted
    service has new plan and instrument objects (the stage somewhere else), and its clock
    continues where the journal left it."""
    folder = base.copy_to(tmp_path / "session")
    store = KillAfter(base.store(), prefix="target-", which="/tilt/")
    first = world(base.spec, seed=7, start_s=base.world.clock.now())
    started: list[str] = []
    with pytest.raises(Killed):
        _run(base.params, first.context(folder, store), started)
    assert store.killed_after is not None and "/tilt/" in store.killed_after
    second = world(base.spec, seed=8, start_s=first.clock.now())
    ctx = second.context(folder, store)
    _run(base.params, ctx, started)
    assert len(started) == len(set(started))                 # no step ran twice
    tilts = [k for k in started if "/tilt/" in k]
    collected = _collected(ctx)
    assert len(tilts) == len(base.params.tilt_scheme.to_scheme().angles()) * len(collected)
    records = ([e for e in first.em.dose.exposures if e.area == "R"],
               [e for e in second.em.dose.exposures if e.area == "R"])
    assert len(records[0]) == 1 and len(records[0]) + len(records[1]) == len(tilts)
    for t in collected:
        miss, _ = _reached_nm(base, [first.em, second.em], ctx, t["id"],
                              _zero_record(ctx, t["id"]))
        assert miss < MAX_MISS_NM, (t["id"], miss)
    assert (folder / ctx.result(REPORT_KEY)["html"]).is_file()


class KillAfter(MemoryStepStore):
    """A journal that kills the service once, right after committing the first key with
    ``prefix`` and ``which`` in it (a committed tilt: its exposure is spent and saved)."""

    def __init__(self, base: MemoryStepStore, prefix: str, which: str) -> None:
        super().__init__()
        for k in base.order:
            r = base.get(k)
            assert r is not None
            super().put(k, r)
        self.prefix, self.which = prefix, which
        self.killed_after: str | None = None

    def put(self, key: str, result: StepResult) -> None:
        super().put(key, result)
        if self.killed_after is None and key.startswith(self.prefix) and self.which in key:
            self.killed_after = key
            raise Killed(f"killed after committing {key}")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs)["src"] or "")
