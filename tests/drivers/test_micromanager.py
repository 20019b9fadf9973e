"""The Micro-Manager driver on a real MMCore with Micro-Manager's demo devices.

Every assertion about hardware state reads the core itself (``mm_connection.core``), not
only the driver, so a driver that merely remembered what it was told would fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import useq

from drivers.clock import VirtualClock
from drivers.errors import (
    Aborted,
    ConfigError,
    DeviceTimeout,
    HardwareFault,
    InvalidState,
    LimitViolation,
)
from drivers.micromanager import MicroManagerLightMicroscope
from drivers.micromanager_config import MicroManagerConfig, demo_config
from drivers.micromanager_core import MMConnection

XY_TOL_UM = 0.02  # the demo XY stage reads back in 0.005 um steps


def mda(**fields: Any) -> useq.MDASequence:
    """A validated useq sequence from plain values, as a config file would give them."""
    return useq.MDASequence.model_validate(fields)


def mda_event(**fields: Any) -> useq.MDAEvent:
    return useq.MDAEvent.model_validate(fields)


def core_xyz(connection: MMConnection) -> tuple[float, float, float]:
    core = connection.core
    return (core.get_x_position("XY"), core.get_y_position("XY"), core.get_position("Z"))


# -- stage ---------------------------------------------------------------------------------


def test_stage_moves_read_back(mm_light: MicroManagerLightMicroscope,
                               mm_connection: MMConnection) -> None:
    mm_light.move_xy(150.0, -75.5)
    mm_light.move_z(12.25)
    x, y, z = core_xyz(mm_connection)
    assert (x, y) == pytest.approx((150.0, -75.5), abs=XY_TOL_UM)
    assert z == pytest.approx(12.25)
    assert mm_light.position_xy() == pytest.approx((x, y))
    assert mm_light.position_z() == pytest.approx(z)


@pytest.mark.parametrize(("axis", "value"), [
    pytest.param("x", 10000.5, id="x-above"),
    pytest.param("y", -10001.0, id="y-below"),
    pytest.param("x", float("nan"), id="x-nan"),
    pytest.param("z", 300.5, id="z-above"),
    pytest.param("z", -1000.0, id="z-below"),
])
def test_out_of_limits_refused_before_moving(mm_light: MicroManagerLightMicroscope,
                                             mm_connection: MMConnection, axis: str,
                                             value: float) -> None:
    mm_light.move_xy(20.0, 30.0)
    mm_light.move_z(4.0)
    before = core_xyz(mm_connection)
    with pytest.raises(LimitViolation, match=f"stage {axis}.*lm.stage_limits.{axis}_um"):
        if axis == "z":
            mm_light.move_z(value)
        else:
            mm_light.move_xy(value if axis == "x" else 0.0, value if axis == "y" else 0.0)
    assert core_xyz(mm_connection) == before


# -- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["405", "488", "561", "640", "DIC"])
def test_channel_switching_sets_preset_and_exposure(mm_light: MicroManagerLightMicroscope,
                                                    mm_connection: MMConnection,
                                                    name: str) -> None:
    cfg = demo_config().channels[name]
    other = "488" if name != "488" else "405"
    mm_light.set_channel(other)
    mm_light.set_channel(name)
    core = mm_connection.core
    assert core.get_current_config(cfg.group) == cfg.preset
    assert core.get_exposure() == pytest.approx(cfg.exposure_s * 1000.0)
    assert mm_light.channel.name == name


def test_snap_in_a_channel_switches_preset(mm_light: MicroManagerLightMicroscope,
                                           mm_connection: MMConnection) -> None:
    img = mm_light.snap("640", exposure_s=0.002)
    assert mm_connection.core.get_current_config("Channel") == "Cy5"
    assert img.channel == "640"
    assert img.exposure_s == pytest.approx(0.002)
    assert mm_connection.core.get_exposure() == pytest.approx(2.0)


@pytest.mark.parametrize(("name", "pixel_config", "pixel_um"), [
    ("10x", "Res10x", 1.0), ("20x", "Res20x", 0.5), ("40x", "Res40x", 0.25),
])
def test_objective_sets_preset_and_pixel_size(mm_light: MicroManagerLightMicroscope,
                                              mm_connection: MMConnection, name: str,
                                              pixel_config: str, pixel_um: float) -> None:
    mm_light.set_objective("40x" if name != "40x" else "10x")
    mm_light.set_objective(name)
    core = mm_connection.core
    assert core.get_current_pixel_size_config() == pixel_config
    assert core.get_pixel_size_um() == pytest.approx(pixel_um)
    img = mm_light.snap()
    assert img.pixel_size_um == pytest.approx(pixel_um)
    assert img.objective == name
    assert np.linalg.norm(img.pixel_to_stage[:, 0]) == pytest.approx(pixel_um)


def test_unknown_channel_and_objective_refused(mm_light: MicroManagerLightMicroscope,
                                               mm_connection: MMConnection) -> None:
    preset = mm_connection.core.get_current_config("Channel")
    with pytest.raises(LimitViolation, match="channel 'GFP' not available"):
        mm_light.set_channel("GFP")
    with pytest.raises(LimitViolation, match="objective '63x' not available"):
        mm_light.set_objective("63x")
    assert mm_connection.core.get_current_config("Channel") == preset


# -- acquisition ---------------------------------------------------------------------------


def test_z_stack_metadata(mm_light: MicroManagerLightMicroscope) -> None:
    mm_light.move_xy(40.0, -60.0)
    seq = mda(channels=({"config": "488"},),
                           z_plan={"range": 4.0, "step": 1.0})
    images = list(mm_light.run_events(seq))
    assert len(images) == 5
    for i, img in enumerate(images):
        expected_z = -2.0 + i
        assert img.index == {"c": 0, "z": i}
        assert img.channel == "488"
        assert img.z_um == pytest.approx(expected_z)
        assert img.stage_um[2] == pytest.approx(expected_z)
        assert img.stage_um[:2] == pytest.approx((40.0, -60.0), abs=XY_TOL_UM)
        assert img.extra["mm_tags"]["ZPosition_um_Intended"] == pytest.approx(expected_z)
        assert img.exposure_s == pytest.approx(0.01)
        assert img.shape == (512, 512) and img.data.dtype == np.uint16
    assert mm_light.position_z() == pytest.approx(2.0)


def test_channels_times_z_indices_and_channel_names(mm_light: MicroManagerLightMicroscope,
                                                    mm_connection: MMConnection) -> None:
    seq = mda(channels=({"config": "405"}, {"config": "640"}),
                           z_plan={"range": 2.0, "step": 1.0}, axis_order=tuple("tcz"))
    images = list(mm_light.run_events(seq))
    assert [(img.index["c"], img.index["z"]) for img in images] == [
        (c, z) for c in range(2) for z in range(3)]
    assert [img.channel for img in images] == ["405"] * 3 + ["640"] * 3
    # the driver's channel follows the run, and matches the hardware afterwards
    assert mm_light.channel.name == "640"
    assert mm_connection.core.get_current_config("Channel") == "Cy5"


def test_grid_2x2_metadata(mm_light: MicroManagerLightMicroscope) -> None:
    mm_light.set_objective("20x")  # 0.5 um pixels: a 512 px frame is 256 um wide
    fov_um = 512 * 0.5
    seq = mda(
        stage_positions=({"x": 300.0, "y": -200.0, "z": 5.0},),
        grid_plan={"rows": 2, "columns": 2, "fov_width": fov_um, "fov_height": fov_um},
    )
    events = list(seq)
    images = list(mm_light.run_events(events))
    assert [img.index["g"] for img in images] == [0, 1, 2, 3]
    centre_px = ((512 - 1) / 2, (512 - 1) / 2)
    for ev, img in zip(events, images, strict=True):
        assert img.stage_um == pytest.approx((ev.x_pos, ev.y_pos, 5.0), abs=XY_TOL_UM)
        assert img.extra["mm_tags"]["XPosition_um_Intended"] == pytest.approx(ev.x_pos)
        assert img.pixel_size_um == pytest.approx(0.5)
        assert img.objective == "20x"
        assert img.pixel_to_stage_xy(centre_px) == pytest.approx(img.stage_um[:2])
    xs = sorted({round(img.stage_um[0]) for img in images})
    ys = sorted({round(img.stage_um[1]) for img in images})
    assert np.diff(xs) == pytest.approx([fov_um], abs=0.05)
    assert np.diff(ys) == pytest.approx([fov_um], abs=0.05)
    assert np.mean(xs) == pytest.approx(300.0, abs=0.05)
    assert np.mean(ys) == pytest.approx(-200.0, abs=0.05)


def test_run_after_manual_changes_reaches_the_event_state(
        mm_light: MicroManagerLightMicroscope, mm_connection: MMConnection) -> None:
    """pycromanager's engine remembers the previous run's last event and skips an exposure
    it believes unchanged; a snap, move or preset change between runs must not fool it."""
    event = mda_event(index={"t": 0}, x_pos=50.0, y_pos=60.0, exposure=5.0)
    list(mm_light.run_events([event]))
    mm_light.snap("405", exposure_s=0.002)
    mm_light.move_xy(0.0, 0.0)
    images = list(mm_light.run_events([event]))
    core = mm_connection.core
    assert core.get_exposure() == pytest.approx(5.0)
    assert core.get_current_config("Channel") == "DAPI"  # events without a channel keep it
    assert core_xyz(mm_connection)[:2] == pytest.approx((50.0, 60.0), abs=XY_TOL_UM)
    for img in images:
        assert img.channel == "405"
        assert img.exposure_s == pytest.approx(0.005)
        assert img.stage_um[:2] == pytest.approx((50.0, 60.0), abs=XY_TOL_UM)


def test_time_points_wait_on_the_clock(mm_light: MicroManagerLightMicroscope,
                                       mm_clock: VirtualClock) -> None:
    seq = mda(time_plan={"interval": 30.0, "loops": 3})
    t0 = mm_clock.now()
    times = [img.time_s - t0 for img in mm_light.run_events(seq)]
    assert times == pytest.approx([0.0, 30.0, 60.0], abs=1e-6)


def test_late_time_point_records_lateness(mm_light: MicroManagerLightMicroscope,
                                          mm_clock: VirtualClock) -> None:
    seq = mda(time_plan={"interval": 10.0, "loops": 3})
    lateness = []
    for img in mm_light.run_events(seq):
        lateness.append(img.extra["late_s"])
        if img.index["t"] == 0:
            mm_clock.advance(25.0)  # the consumer dawdles past the next time point
    # the schedule stays anchored at the start: t=1 was due at 10 s, t=2 at 20 s
    assert lateness == pytest.approx([0.0, 15.0, 5.0], abs=1e-6)


def test_hundred_frames_stream_in_order(mm_light: MicroManagerLightMicroscope) -> None:
    mm_light.set_channel("DIC")
    seq = mda(time_plan={"interval": 0, "loops": 100})
    images = list(mm_light.run_events(seq))
    assert [img.index["t"] for img in images] == list(range(100))
    assert all(img.channel == "DIC" for img in images)


def test_abort_stops_a_run(mm_light: MicroManagerLightMicroscope,
                           mm_connection: MMConnection) -> None:
    seq = mda(time_plan={"interval": 0, "loops": 200})
    received = 0
    with pytest.raises(Aborted):
        for _ in mm_light.run_events(seq):
            received += 1
            if received == 2:
                mm_light.abort()
    assert received == 2
    assert not mm_connection.core.is_sequence_running()
    # the driver is usable at once, and the abort was consumed
    mm_light.move_xy(10.0, 10.0)
    assert mm_light.snap().shape == (512, 512)


def test_abort_during_a_time_point_wait(mm_light: MicroManagerLightMicroscope,
                                        mm_clock: VirtualClock) -> None:
    seq = mda(time_plan={"interval": 600.0, "loops": 3})
    run = mm_light.run_events(seq)
    first = next(run)
    assert first.index["t"] == 0
    mm_light.abort()
    with pytest.raises(Aborted):
        next(run)
    assert mm_clock.now() - first.time_s < 1.0  # did not sit out the 10-minute interval


def test_stopping_early_leaves_the_driver_usable(mm_light: MicroManagerLightMicroscope,
                                                 mm_connection: MMConnection) -> None:
    seq = mda(time_plan={"interval": 0, "loops": 100})
    run = mm_light.run_events(seq)
    next(run)
    run.close()
    assert not mm_connection.core.is_sequence_running()
    assert mm_light.snap().shape == (512, 512)


def test_event_properties_are_set_between_frames(mm_light: MicroManagerLightMicroscope,
                                                 mm_connection: MMConnection) -> None:
    core = mm_connection.core
    core.set_property("Camera", "Mode", "Artificial Waves")
    events = [mda_event(index={"t": 0}),
              mda_event(index={"t": 1}, properties=[("Camera", "Mode", "Fluorescent Beads")]),
              mda_event(index={"t": 2})]
    try:
        images = list(mm_light.run_events(events))
        assert [img.index["t"] for img in images] == [0, 1, 2]
        assert core.get_property("Camera", "Mode") == "Fluorescent Beads"
    finally:
        core.set_property("Camera", "Mode", "Artificial Waves")


def test_hardware_error_mid_run_raises_and_leaves_driver_usable(
        mm_light: MicroManagerLightMicroscope, mm_connection: MMConnection) -> None:
    events = [mda_event(index={"t": 0}),
              mda_event(index={"t": 1}, properties=[("Camera", "Mode", "No Such Mode")]),
              mda_event(index={"t": 2})]
    received = []
    with pytest.raises(HardwareFault, match="acquisition failed"):
        for img in mm_light.run_events(events):
            received.append(img.index["t"])
    assert received == [0]
    assert not mm_connection.core.is_sequence_running()
    assert mm_light.snap().shape == (512, 512)


def test_engine_error_it_does_not_report_ends_in_a_timeout(
        mm_connection: MMConnection) -> None:
    """pycromanager 1.0.2 swallows a failed move inside its engine; the frame timeout must
    still end the run with an error, and the driver must be usable afterwards."""
    config = demo_config().replace(frame_timeout_s=0.3,
                                   stage_limits={"x_um": (-1e4, 1e4), "y_um": (-1e4, 1e4),
                                                 "z_um": (-1000.0, 1000.0)})
    light = MicroManagerLightMicroscope(config, mm_connection, VirtualClock())
    events = [mda_event(index={"z": 0}, z_pos=0.0), mda_event(index={"z": 1}, z_pos=500.0)]
    with pytest.raises(DeviceTimeout, match="lm.frame_timeout_s"):
        list(light.run_events(events))  # the demo focus drive stops at +-300 um
    assert not mm_connection.core.is_sequence_running()
    light.move_z(1.0)
    assert light.snap().z_um == pytest.approx(1.0)


def test_events_checked_before_anything_runs(mm_light: MicroManagerLightMicroscope,
                                             mm_connection: MMConnection) -> None:
    before = core_xyz(mm_connection)
    bad_channel = [mda_event(x_pos=50.0, y_pos=50.0),
                   mda_event(channel={"config": "GFP"})]
    with pytest.raises(LimitViolation, match="GFP"):
        list(mm_light.run_events(bad_channel))
    off_stage = [mda_event(x_pos=50.0, y_pos=50.0), mda_event(z_pos=400.0)]
    with pytest.raises(LimitViolation, match="stage z"):
        list(mm_light.run_events(off_stage))
    autofocus_action = [mda_event(x_pos=50.0, y_pos=50.0),
                        mda_event(action={"type": "hardware_autofocus"})]
    with pytest.raises(InvalidState, match="hardware_autofocus"):
        list(mm_light.run_events(autofocus_action))
    assert core_xyz(mm_connection) == before


def test_hardware_autofocus(mm_light: MicroManagerLightMicroscope) -> None:
    mm_light.move_z(3.0)
    z = mm_light.autofocus(range_um=10.0)
    assert z == pytest.approx(mm_light.position_z())
    assert abs(z - 3.0) <= 5.0


def test_image_autofocus_without_a_device(mm_connection: MMConnection) -> None:
    config = demo_config().replace(autofocus_device=None)
    with MicroManagerLightMicroscope(config, mm_connection, VirtualClock()) as light:
        light.move_z(0.0)
        z = light.autofocus(range_um=4.0, step_um=1.0)
        assert -2.0 <= z <= 2.0
        assert light.position_z() == pytest.approx(z)


# -- configuration -------------------------------------------------------------------------


def _demo_dump() -> dict[str, Any]:
    return demo_config().model_dump()


def _with(path: str, value: Any) -> dict[str, Any]:
    data = _demo_dump()
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


CONFIG_CASES = [
    pytest.param(_with("objectives.10x.pixel_size_um", 1.0), "lm.objectives.10x",
                 "exactly one of", id="two-pixel-size-sources"),
    pytest.param(_with("objectives.10x.pixel_size_config", None), "lm.objectives.10x",
                 "exactly one of", id="no-pixel-size-source"),
    pytest.param(_with("channels.488.exposure_s", -0.1), "lm.channels.488.exposure_s",
                 "greater than 0", id="negative-exposure"),
    pytest.param(_with("objectives.20x.numerical_aperture", 2.5),
                 "lm.objectives.20x.numerical_aperture", "less than or equal", id="na-too-big"),
    pytest.param(_with("stage_limits.z_um", (300.0, -300.0)), "lm.stage_limits.z_um",
                 "lower < upper", id="limits-reversed"),
    pytest.param(_with("stage_limit", {}), "lm.stage_limit", "Extra inputs",
                 id="misspelt-key"),
    pytest.param(_with("connection.kind", "serial"), "lm.connection", "does not match",
                 id="unknown-connection-kind"),
    pytest.param(_with("connection.config_file", "nope.cfg"),
                 "lm.connection.headless.config_file",
                 "does not exist", id="missing-config-file"),
    pytest.param(_with("channels", {}), "lm.channels", "at least 1", id="no-channels"),
]


@pytest.mark.parametrize(("data", "field", "message"), CONFIG_CASES)
def test_config_errors_name_the_field(data: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        MicroManagerConfig.from_mapping(data)
    assert info.value.field == field


def test_bridge_connection_config() -> None:
    data = _with("connection", {"kind": "bridge", "port": 4827})
    assert MicroManagerConfig.from_mapping(data).connection.kind == "bridge"
    with pytest.raises(ConfigError) as info:
        MicroManagerConfig.from_mapping(_with("connection", {"kind": "bridge", "port": 80}))
    assert info.value.field == "lm.connection.bridge.port"


def test_config_is_frozen_and_replace_revalidates() -> None:
    config = demo_config()
    with pytest.raises(Exception, match="frozen"):
        setattr(config, "frame_timeout_s", 1.0)  # noqa: B010  (mypy would refuse the plain form)
    with pytest.raises(ConfigError) as info:
        config.replace(frame_timeout_s=-1.0)
    assert info.value.field == "lm.frame_timeout_s"


@pytest.mark.parametrize(("path", "value", "field"), [
    pytest.param("channels.488.preset", "GFP", "lm.channels.488.preset", id="unknown-preset"),
    pytest.param("channels.488.group", "Filters", "lm.channels.488.group", id="unknown-group"),
    pytest.param("objectives.40x.pixel_size_config", "Res63x",
                 "lm.objectives.40x.pixel_size_config", id="unknown-pixel-config"),
    pytest.param("xy_stage_device", "Prior", "lm.xy_stage_device", id="unknown-device"),
])
def test_config_checked_against_the_core(mm_connection: MMConnection, path: str, value: str,
                                         field: str) -> None:
    config = MicroManagerConfig.from_mapping(_with(path, value))
    with pytest.raises(ConfigError) as info:
        MicroManagerLightMicroscope(config, mm_connection, VirtualClock())
    assert info.value.field == field


def test_explicit_pixel_size_without_a_pixel_config(mm_connection: MMConnection) -> None:
    data = _with("objectives.40x.pixel_size_config", None)
    data["objectives"]["40x"]["pixel_size_um"] = 0.2
    light = MicroManagerLightMicroscope(MicroManagerConfig.from_mapping(data), mm_connection,
                                        VirtualClock())
    light.set_objective("40x")
    assert light.snap().pixel_size_um == pytest.approx(0.2)


def test_second_in_process_core_refused(mm_connection: MMConnection) -> None:
    with pytest.raises(InvalidState, match="already running"):
        MMConnection.open(demo_config().connection)
    assert mm_connection.core.get_loaded_devices()  # the shared core is untouched


def test_demo_config_paths_exist() -> None:
    connection = demo_config().connection
    assert connection.kind == "headless"
    assert Path(connection.config_path).is_file()
