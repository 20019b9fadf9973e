"""SerialEM's own montage through the real driver, over TCP to the SerialEM twin.

The twin montages on the simulated TEM (simulators/serialem_montage_commands.py), so the
tiles the driver returns can be checked against what the twin reported (StagePosition per
piece) and against the simulator's truth (where each frame really was). Everything runs on
the virtual clock.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from drivers.base import AcquisitionSettings, LowDoseArea, apply_affine
from drivers.clock import VirtualClock
from drivers.errors import ConnectionLost, HardwareFault, InvalidState, LimitViolation
from drivers.serialem.client import SerialEMClient, SerialEMScriptError
from drivers.serialem.microscope import SerialEMElectronMicroscope
from drivers.serialem.montage import MontageGrid, plan_grid
from protocols.plan import MemoryStepStore, StepContext, run_plan
from protocols.square_map import SquareMapParams, SquareMapPlan, map_key
from simulators.electron import SimulatedElectronMicroscope
from simulators.electron_config import ElectronSimConfig
from simulators.serialem_server import SerialEMTwin, TwinFaults
from simulators.serialem_state import MontageFile
from simulators.specimen import Specimen

CAMERA = (96, 128)
FOLDER = "D:\\clemd\\montages"
#: 110x, 0.099 um pixels, rotated 92.2 deg: a 12.7 x 9.5 um frame at binning 1.
LM_INDEX = 3
Make = Callable[..., tuple[SerialEMTwin, SerialEMElectronMicroscope]]
MakeTwin = Callable[..., SerialEMTwin]


@pytest.fixture
def make(make_serialem: Make) -> Make:
    """(twin, driver) with the commands sent recorded (conftest.make_serialem): ``sim``
    overrides simulator fields, ``resend_window_s`` the client's, ``config`` the driver's
    settings (montage_dir set unless given as None)."""
    return functools.partial(make_serialem, CAMERA, record=True, montage_dir=FOLDER,
                             camera_shape=CAMERA)


def _sim(twin: SerialEMTwin) -> SimulatedElectronMicroscope:
    assert isinstance(twin.em, SimulatedElectronMicroscope)
    return twin.em




def _lm(em: SerialEMElectronMicroscope, area: LowDoseArea = LowDoseArea.VIEW
        ) -> AcquisitionSettings:
    """The area's preset at the LM magnification, binning 1."""
    return replace(em.low_dose[area], mag_index=LM_INDEX, binning=1)


def _square_centre(specimen: Specimen) -> tuple[float, float]:
    sq = specimen.squares[len(specimen.squares) // 2]
    x, y = specimen.truth.grid_to_em_stage(np.asarray(sq.centre_um, float))
    return float(x), float(y)


def _only_montage(twin: SerialEMTwin) -> MontageFile:
    assert len(twin.state.montages) == 1
    return twin.state.montages[0]


# --------------------------------------------------------------------------- the montage


def test_montage_returns_the_pieces_where_serialem_recorded_them(make: Make,
                                                                 specimen: Specimen) -> None:
    twin, em = make()
    assert em.native_montage
    settings = _lm(em)
    centre = _square_centre(specimen)
    tiles = em.montage(centre, (3, 2), overlap=0.25, area=LowDoseArea.VIEW, settings=settings)

    assert len(tiles) == 6
    assert [t.index for t in tiles] == [{"tile": k} for k in range(6)]
    mag = em.magnifications[LM_INDEX]
    for t in tiles:
        assert t.shape == CAMERA and t.binning == 1
        assert t.pixel_size_um == pytest.approx(mag.pixel_size_um)
        assert (t.mag_index, t.low_dose_area) == (LM_INDEX, "V")
        assert t.extra["montage_file"].startswith(FOLDER + "\\")

    montage = _only_montage(twin)
    assert twin.state.montage is None                       # closed afterwards
    assert (montage.nx, montage.ny, montage.frame) == (3, 2, (128, 96))
    assert montage.overlap == (32, 24)                      # 0.25 of the frame, whole pixels
    sim = _sim(twin)
    limit = 4 * sim.config.stage.repeatability_rms_um + sim.config.stage.backlash_um
    for t in tiles:
        ix, iy = t.extra["serialem_piece"]
        piece = montage.pieces[(ix - 1, iy - 1)]
        # the stage position is the one SerialEM reported for the piece, not the request
        assert t.stage_um[:2] == pytest.approx(piece.meta["StagePosition"])
        assert np.array_equal(t.data, piece.data)
        # ... and the tile's affine puts its centre where the frame really was
        h, w = t.shape
        mid = np.array([(w - 1) / 2, (h - 1) / 2])
        true = apply_affine(sim.true_pixel_to_stage(montage.images[(ix - 1, iy - 1)]), mid)
        assert np.linalg.norm(apply_affine(t.pixel_to_stage, mid) - true) < limit


def test_tiles_come_in_the_order_of_the_requested_positions(make: Make,
                                                            specimen: Specimen) -> None:
    _, em = make()
    settings = _lm(em)
    centre = _square_centre(specimen)
    tiles = em.montage(centre, (3, 2), overlap=0.25, area=LowDoseArea.VIEW, settings=settings)
    wanted = em.montage_positions(centre, (3, 2), 0.25, settings)
    for t, (x, y) in zip(tiles, wanted, strict=True):
        assert np.hypot(t.stage_um[0] - x, t.stage_um[1] - y) < 0.05   # reported = commanded
    # neighbours overlap as SerialEM laid them out: a frame less the overlap apart
    px = em.magnifications[LM_INDEX].pixel_size_um
    step_x, step_y = (128 - 32) * px, (96 - 24) * px
    assert np.hypot(*np.subtract(tiles[1].stage_um[:2], tiles[0].stage_um[:2])) == \
        pytest.approx(step_x, abs=0.05)
    assert np.hypot(*np.subtract(tiles[3].stage_um[:2], tiles[0].stage_um[:2])) == \
        pytest.approx(step_y, abs=0.05)
    coords = {t.extra["serialem_piece"]: t.extra["piece_coordinates_px"] for t in tiles}
    assert coords[(2, 1)][0] - coords[(1, 1)][0] == 128 - 32
    assert coords[(1, 2)][1] - coords[(1, 1)][1] == 96 - 24
    # the stage went back to the centre, as SerialEM's montage does
    assert em.stage_position()[:2] == pytest.approx(centre, abs=1e-3)


@pytest.mark.parametrize(("area", "flags"), [
    (LowDoseArea.VIEW, (True, False)),
    (LowDoseArea.SEARCH, (False, True)),
    (LowDoseArea.RECORD, (False, False)),
])
def test_the_montage_shoots_in_the_requested_area(make: Make, area: LowDoseArea,
                                                  flags: tuple[bool, bool]) -> None:
    twin, em = make()
    tiles = em.montage((0.0, 0.0), (2, 1), overlap=0.25, area=area, settings=_lm(em, area))
    assert (twin.state.montage_use_view, twin.state.montage_use_search) == flags
    frames = _only_montage(twin).images.values()
    assert {f.low_dose_area for f in frames} == {area.value}
    assert {t.low_dose_area for t in tiles} == {area.value}


def test_command_sequence(make: Make, serialem_calls: dict[int, list[str]]) -> None:
    _, em = make()
    em.montage((0.0, 0.0), (1, 2), overlap=0.25, area=LowDoseArea.VIEW, settings=_lm(em))
    skip = ("Report", "SetExposure", "SetBinning", "SetMagIndex")
    calls = [c for c in serialem_calls[id(em)] if not c.startswith(skip)]
    assert calls[:3] == ["MoveStageTo", "SetLowDoseMode", "GoToLowDoseArea"]
    assert calls[3:10] == ["ParamSetToUseForMontage", "ParamSetToUseForMontage",
                           "MakeDirectory", "OpenNewMontage", "SetMontageParams", "Montage",
                           "ReadMontagePiece"]
    assert calls.count("ReadMontagePiece") == 2 and calls.count("get_image P") == 2
    assert calls[-1] == "CloseFile"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case", ["outside-travel", "overlap-too-small", "frame-too-small",
                                  "focus-area"])
@pytest.mark.parametrize("call", ["montage", "check_montage"])
def test_refused_before_any_command(make: Make, serialem_calls: dict[int, list[str]],
                                    case: str, call: str) -> None:
    """``montage`` refuses before sending anything, and ``check_montage`` (what a plan's
    validate calls, long before the montage) refuses the same requests."""
    twin, em = make()
    lm = _lm(em)
    run = getattr(em, call)
    with pytest.raises(LimitViolation) as err:
        if case == "outside-travel":
            run((em.limits.x.upper - 5.0, 0.0), (3, 3), 0.25, LowDoseArea.VIEW, lm)
        elif case == "overlap-too-small":        # 0.1 of 128 px is 13 px; SerialEM wants 16
            run((0.0, 0.0), (3, 3), 0.1, LowDoseArea.VIEW, lm)
        elif case == "frame-too-small":          # View at binning 8: 16 px frames
            run((0.0, 0.0), (2, 2), 0.25, LowDoseArea.VIEW)
        else:
            run((0.0, 0.0), (2, 1), 0.25, LowDoseArea.FOCUS, _lm(em, LowDoseArea.FOCUS))
    assert serialem_calls[id(em)] == [], err.value
    assert twin.state.montages == []


def test_check_montage_passes_what_montage_runs_and_moves_nothing(
        make: Make, serialem_calls: dict[int, list[str]]) -> None:
    twin, em = make()
    lm = _lm(em)
    positions = em.check_montage((0.0, 0.0), (2, 1), 0.25, LowDoseArea.VIEW, lm)
    assert len(positions) == 2 and serialem_calls[id(em)] == []
    assert twin.state.montages == []


def test_positions_that_are_no_grid_are_refused() -> None:
    twin_like = SimulatedElectronMicroscope.for_tests(Specimen.generate(seed=1), VirtualClock(),
                                                      camera=CAMERA)
    mag = twin_like.magnifications[LM_INDEX]
    with pytest.raises(LimitViolation, match="row-by-row grid"):
        plan_grid([(0.0, 0.0), (5.0, 1.0), (2.0, 9.0)], mag, CAMERA, 1, twin_like.limits)
    with pytest.raises(LimitViolation, match="evenly spaced"):
        settings = AcquisitionSettings(mag_index=LM_INDEX, exposure_s=1.0)
        row = twin_like.montage_positions((0.0, 0.0), (4, 1), 0.25, settings)
        uneven = [row[0], row[1], row[2], (2 * row[3][0] - row[2][0], 2 * row[3][1] - row[2][1])]
        plan_grid(uneven, mag, CAMERA, 1, twin_like.limits)
    grid = plan_grid(twin_like.montage_positions((0.0, 0.0), (1, 3), 0.3,
                                                 AcquisitionSettings(LM_INDEX, 1.0)),
                     mag, CAMERA, 1, twin_like.limits)
    assert isinstance(grid, MontageGrid)
    assert (grid.nx, grid.ny, grid.overlap_px[1]) == (1, 3, 96 - round(0.7 * 96))
    assert grid.overlap_px[0] == round(grid.overlap_px[1] / 96 * 128)   # y's fraction


def test_a_layout_serialem_does_not_share_is_a_hardware_fault(make: Make) -> None:
    """The driver's table says the LM camera is rotated 0 deg; SerialEM (the twin) lays out
    along its own 92.2 deg: pieces land far from the requested positions."""
    table = [{"index": m.index, "magnification": m.magnification,
              "pixel_size_um": m.pixel_size_um,
              "rotation_deg": 0.0 if m.index == LM_INDEX else m.rotation_deg}
             for m in ElectronSimConfig().magnifications]
    twin2, em2 = make(magnifications=table)
    with pytest.raises(HardwareFault, match="rotation_deg"):
        em2.montage((0.0, 0.0), (3, 1), 0.25, LowDoseArea.VIEW, _lm(em2))
    assert twin2.state.montage is None


# --------------------------------------------------------------------------- failures


def test_a_link_dropped_while_montaging_is_resent(make: Make) -> None:
    twin, em = make(faults=TwinFaults(drop_link_on="Montage"))
    tiles = em.montage((0.0, 0.0), (2, 2), 0.25, LowDoseArea.VIEW, _lm(em))
    assert len(tiles) == 4 and twin.connections == 2


def test_a_link_lost_while_montaging_raises_and_returns_nothing(
        make: Make, serialem_calls: dict[int, list[str]]) -> None:
    twin, em = make(faults=TwinFaults(drop_link_on="Montage"), resend_window_s=0.0)
    with pytest.raises(ConnectionLost):
        em.montage((0.0, 0.0), (2, 2), 0.25, LowDoseArea.VIEW, _lm(em))
    assert serialem_calls[id(em)][-1] == "CloseFile"   # cleanup reconnected, closed the file
    assert twin.state.montage is None
    assert _only_montage(twin).pieces == {}     # SerialEM never montaged


def test_a_script_error_while_montaging_raises_and_closes_the_file(make: Make) -> None:
    twin, em = make(sim={"faults": {"stage_fault_after_moves": 3}})
    with pytest.raises(SerialEMScriptError, match="stage does not respond"):
        em.montage((0.0, 0.0), (2, 2), 0.25, LowDoseArea.VIEW, _lm(em))
    assert twin.state.montage is None
    assert len(_only_montage(twin).pieces) == 2    # SerialEM stopped part way


def test_without_a_montage_folder_the_tile_loop_runs(make: Make,
                                                     serialem_calls: dict[int, list[str]]) -> None:
    twin, em = make(montage_dir=None)
    assert not em.native_montage
    tiles = em.montage((0.0, 0.0), (2, 1), 0.25, LowDoseArea.VIEW, _lm(em))
    assert len(tiles) == 2 and twin.state.montages == []
    assert "Montage" not in serialem_calls[id(em)]


# --------------------------------------------------------------------------- the twin itself


@pytest.fixture
def client(make_serialem_twin: MakeTwin) -> Iterator[tuple[SerialEMTwin, SerialEMClient]]:
    """A bare client on a twin in low dose, as a script would talk to SerialEM."""
    twin = make_serialem_twin(sim={"camera": CAMERA})
    host, port = twin.address
    link = SerialEMClient(host, port, clock=VirtualClock())
    link.call("SetLowDoseMode", 1)
    yield twin, link
    with contextlib.suppress(ConnectionLost, InvalidState):
        link.close()


@pytest.mark.parametrize(("calls", "message"), [
    ([("SetMontageParams", 1)], "Montaging must be on already"),
    ([("OpenNewMontage", 2, 2, "a.mrc"), ("SetMontageParams", 1, 8)],
     "The X overlap must be at least 16"),
    ([("OpenNewMontage", 2, 2, "a.mrc"), ("SetMontageParams", 1, 0, 20)],
     "The Y overlap must be at least 16"),                 # SerialEM checks the X entry
    ([("OpenNewMontage", 2, 2, "a.mrc"), ("SetMontageParams", 1, 70)],
     "X overlap is more than half the frame size"),
    ([("OpenNewMontage", 2, 2, "a.mrc"), ("CloseFile",), ("OpenNewMontage", 2, 2, "a.mrc")],
     "a.mrc already exists"),
    ([("OpenNewMontage", 0, 2, "a.mrc")], "Number of montages pieces is missing"),
    ([("Montage",)], "montaging is not activated"),
    ([("OpenNewMontage", 2, 2, "a.mrc"), ("Montage",)], "one stage montage per file"),
    ([("OpenNewMontage", 2, 2, "a.mrc"), ("ParamSetToUseForMontage", 2)],
     "should be selected before a montage is opened"),
    ([("ReadMontagePiece", 1, 1, 0, "P")], "because there is no open file"),
    ([("CloseFile", "x")], "there is no open file"),
])
def test_twin_refuses_as_serialem_does(client: tuple[SerialEMTwin, SerialEMClient],
                                       calls: list[tuple[Any, ...]], message: str) -> None:
    _, link = client
    with pytest.raises(SerialEMScriptError, match=message):
        for name, *args in calls:
            link.call(name, *args)


def test_twin_reads_pieces_and_their_metadata(client: tuple[SerialEMTwin, SerialEMClient]
                                             ) -> None:
    twin, link = client
    link.call("ParamSetToUseForMontage", 2)                 # View: binning 8 -> 16 x 12 px
    link.call("SetBinning", "V", 1)
    link.call("OpenNewMontage", 2, 1, "b.mrc")
    assert link.call("ReportNumMontagePieces") == 2.0
    link.call("SetMontageParams", 1, 32, 24, 128, 96, 1, 1.0)
    before = twin.em.stage_position()
    link.call("Montage")
    assert twin.em.stage_position() == pytest.approx(before)    # back at the centre
    assert link.call("ReportFileZsize") == (2.0, 1.0)
    link.call("ReadMontagePiece", 2, 1, 0, "Q")
    montage = twin.state.montage
    assert montage is not None
    assert link.call("ReportMetadataValues", "Q", "StagePosition") == \
        pytest.approx(montage.pieces[(1, 0)].meta["StagePosition"])
    assert link.call("ReportMetadataValues", "Q", "PieceCoordinates") == (96.0, 0.0, 0.0)
    assert link.get_image("Q").shape == CAMERA
    with pytest.raises(SerialEMScriptError, match="Could not find piece"):
        link.call("ReadMontagePiece", 1, 2, 0, "Q")
    with pytest.raises(SerialEMScriptError, match="Key Nope does not exist"):
        link.call("ReportMetadataValues", "Q", "Nope")
    link.call("CloseFile")
    assert twin.state.montage is None and link.call("ReportNumMontagePieces") == 1.0
    link.call("Record")                                      # shots carry metadata too
    assert link.call("ReportMetadataValues", "A", "StagePosition") == pytest.approx(before[:2])


# --------------------------------------------------------------------------- in a plan


@pytest.mark.parametrize("folder", [FOLDER, None], ids=["montage-folder", "no-folder"])
def test_square_map_uses_serialems_montage_when_the_driver_has_one(
        make: Make, specimen: Specimen, serialem_calls: dict[int, list[str]], tmp_path: Path,
        folder: str | None) -> None:
    """``acquisition="auto"`` (the default): one journal step running SerialEM's Montage
    with a montage folder, one step per tile without; the map is stitched either way."""
    _, em = make(montage_dir=folder)
    x, y = _square_centre(specimen)
    params = SquareMapParams(squares=({"id": "s1", "x_um": x, "y_um": y},), tiles_xy=(3, 2),
                             overlap=0.25, overview=None,
                             settings={"mag_index": LM_INDEX, "binning": 1})
    ctx = StepContext(clock=em.clock, data_dir=tmp_path, store=MemoryStepStore(), em=em)
    ran = run_plan(SquareMapPlan(params), ctx)
    tile_steps = [k for k in ran if not k.endswith(("/stitch", "/overview"))]
    if folder is None:
        assert tile_steps == [f"square-s1/map/tile-{k:03d}" for k in range(6)]
        assert "Montage" not in serialem_calls[id(em)]
    else:
        assert tile_steps == ["square-s1/map/montage"]
        assert serialem_calls[id(em)].count("Montage") == 1
        assert len(ctx.result("square-s1/map/montage")["tiles"]) == 6
    result = ctx.result(map_key("s1"))
    assert (tmp_path / result["mrc"]).exists()


def test_a_montage_serialem_cannot_lay_out_falls_back_to_tiles(
        make: Make, specimen: Specimen) -> None:
    """Overlap 0.1 of a 128 px frame is 13 px, below SerialEM's 16: "auto" takes tile steps
    and says why; asking for "montage" outright is refused before anything moves."""
    _, em = make()
    x, y = _square_centre(specimen)
    common = {"squares": ({"id": "s1", "x_um": x, "y_um": y},), "tiles_xy": (3, 3),
              "overlap": 0.1, "overview": None, "settings": {"mag_index": LM_INDEX, "binning": 1}}
    auto = SquareMapPlan(SquareMapParams(**common))
    assert auto.layout(em, auto.p.squares[0]).acquisition == "tiles"
    forced = SquareMapPlan(SquareMapParams(**common, acquisition="montage"))
    ctx = StepContext(clock=em.clock, data_dir=Path("."), store=MemoryStepStore(), em=em)
    with pytest.raises(LimitViolation, match="square s1 map refused before moving"):
        forced.validate(ctx)
