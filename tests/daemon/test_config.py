"""Config: one TOML file, validated; an error names the field and the service does not start."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import config_from_mapping, is_loopback, load_config
from daemon.errors import InstrumentUnavailable
from daemon.instruments import _import
from daemon.security import load_keys
from drivers.errors import ConfigError

GOOD = """
data_dir = "data"
[api]
bind = "tcp://127.0.0.1:5555"
events = "tcp://127.0.0.1:5556"
[lm]
kind = "simulated"
[em]
kind = "simulated"
settings = { camera_shape = [128, 128] }
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "clemd.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_good_config_resolves_paths_next_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.data_dir == (tmp_path / "data").resolve()
    assert cfg.simulated and cfg.runner.on_restart == "resume"
    assert cfg.api.max_request_bytes == 1 << 20


CASES = [
    ("missing-data-dir", {}, "data_dir"),
    ("wrong-type", {"api": {"max_request_bytes": "big"}}, "api.max_request_bytes"),
    ("too-small", {"api": {"max_request_bytes": 10}}, "api.max_request_bytes"),
    ("unknown-key", {"api": {"bnid": "tcp://127.0.0.1:1"}}, "api.bnid"),
    ("no-port", {"api": {"bind": "tcp://127.0.0.1"}}, "api.bind"),
    ("not-tcp", {"api": {"bind": "udp://127.0.0.1:5"}}, "api.bind"),
    ("open-without-curve", {"api": {"bind": "tcp://0.0.0.0:5555"}}, "api.bind"),
    ("curve-without-key", {"security": {"curve": True}}, "security"),
    ("unknown-kind", {"lm": {"kind": "zeiss"}}, "lm"),
    ("em-kind-for-lm", {"lm": {"kind": "serialem"}}, "lm"),
    ("bad-role", {"security": {"clients": [{"name": "a", "public_key_file": "a.key",
                                            "role": "admin"}]}}, "security.clients.0.role"),
    ("bad-on-restart", {"runner": {"on_restart": "maybe"}}, "runner.on_restart"),
    ("bad-watchdog", {"runner": {"watchdog_s": -1}}, "runner.watchdog_s"),
    ("sim-lm-setting", {"lm": {"kind": "simulated", "settings": {"camera": {"shape": [2, 2]}}}},
     "lm.settings.camera"),
    ("sim-em-setting", {"em": {"kind": "simulated", "settings": {"camera_shape": [1, 1]}}},
     "em.settings.camera_shape"),
    ("specimen-setting", {"lm": {"kind": "simulated"},
                          "simulation": {"specimen": {"pitch_um": -1}}},
     "simulation.specimen.pitch_um"),
    ("micromanager-settings", {"lm": {"kind": "micromanager", "settings": {"objectives": {}}}},
     "lm.settings"),
]


@pytest.mark.parametrize("data,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_errors_name_the_field(tmp_path: Path, data: dict[str, object], field: str) -> None:
    full = {"data_dir": str(tmp_path), **data} if "missing" not in field else data
    if field == "data_dir":
        full = dict(data)
    with pytest.raises(ConfigError) as info:
        config_from_mapping(full)
    assert info.value.field.startswith(field), info.value
    if data == {"api": {"bind": "tcp://0.0.0.0:5555"}}:  # a whole-model rule's message
        assert "security.curve" in str(info.value)


def test_loopback_detection() -> None:
    assert is_loopback("tcp://127.0.0.1:1") and is_loopback("tcp://[::1]:1")
    assert is_loopback("tcp://localhost:1")
    assert not is_loopback("tcp://0.0.0.0:1") and not is_loopback("tcp://10.0.0.2:1")
    assert not is_loopback("tcp://*:1")


def test_a_driver_that_is_not_there_fails_clearly() -> None:
    with pytest.raises(InstrumentUnavailable, match="driver zeiss not available"):
        _import("drivers.zeiss_does_not_exist", "zeiss")


def test_serialem_settings_are_checked_by_the_driver_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"data_dir": str(tmp_path), "em": {"kind": "serialem",
                                                               "settings": {"port": 1}}})
    assert info.value.field == "em.settings.magnifications"
    cfg = config_from_mapping({"data_dir": str(tmp_path), "em": {"kind": "serialem", "settings": {
        "port": 48888, "magnifications": [{"index": 1, "magnification": 4700,
                                           "pixel_size_um": 0.002}]}}})
    assert not cfg.simulated


def test_cli_refuses_a_bad_config_and_does_not_start(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path, GOOD.replace('kind = "simulated"\n[em]', 'kind = "zeiss"\n[em]'))
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "lm" in err
    assert not (tmp_path / "data").exists()          # nothing was created
    assert main(["check-config", "--config", str(bad)]) == 2
    assert main(["check-config", "--config", str(_write(tmp_path, GOOD))]) == 0
    assert main(["check-config", "--config", str(tmp_path / "nope.toml")]) == 2
    assert main(["check-config", "--config", str(_write(tmp_path, "data_dir = ["))]) == 2


def test_deploy_examples_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "deploy"
    sim = load_config(root / "clemd-simulated.toml")
    assert sim.simulated and not sim.security.curve
    facility = load_config(root / "clemd-facility.toml")
    assert not facility.simulated and facility.security.curve
    assert {c.role.value for c in facility.security.clients} == {"operator", "observer"}
    with pytest.raises(ConfigError, match="security.server_secret_key_file"):
        load_keys(facility.security)          # the key files exist only at the facility


AUTO = {"runner": {"auto_confirm_checkpoints": True}}


@pytest.mark.parametrize("instruments", [
    {"lm": {"kind": "micromanager", "settings": {}}, "em": {"kind": "simulated"}},
    {"lm": {"kind": "simulated"}, "em": {"kind": "serialem", "settings": {}}},
    {"lm": {"kind": "simulated"}},
], ids=["real-lm", "real-em", "no-em"])
def test_auto_confirm_needs_both_instruments_simulated(tmp_path: Path,
                                                       instruments: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"data_dir": str(tmp_path), **AUTO, **instruments})
    assert info.value.field == "runner.auto_confirm_checkpoints"
    assert "simulated" in str(info.value) and "clemctl confirm" in str(info.value)


def test_auto_confirm_with_simulators_is_accepted(tmp_path: Path) -> None:
    cfg = config_from_mapping({"data_dir": str(tmp_path), **AUTO, "lm": {"kind": "simulated"},
                               "em": {"kind": "simulated"}})
    assert cfg.runner.auto_confirm_checkpoints and cfg.simulated
    plain = config_from_mapping({"data_dir": str(tmp_path), "lm": {"kind": "simulated"}})
    assert not plain.runner.auto_confirm_checkpoints        # off by default
