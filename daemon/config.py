"""The service's one config file: TOML, validated here, frozen afterwards.

A config error names the field (``api.max_request_bytes``, ``lm.settings.port``) and the
service does not start. Relative paths are relative to the config file's folder. Instrument
settings sub-tables are checked by the driver's own model when that driver exists
(daemon/instruments.py); a driver that does not exist fails at start, never silently.
"""

from __future__ import annotations

import ipaddress
import tomllib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from drivers.errors import ConfigError, config_error

SCHEMA_VERSION = 1


class Model(BaseModel):
    """Frozen; misspelt keys are refused rather than dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def _relative_to_config(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]


class Role(str, Enum):
    """What a client key may do: operators change things, observers read and subscribe."""

    OPERATOR = "operator"
    OBSERVER = "observer"


def is_loopback(address: str) -> bool:
    """True for tcp://127.x.x.x:port, tcp://[::1]:port and tcp://localhost:port."""
    parts = urlsplit(address)
    if parts.scheme != "tcp" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _tcp_address(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "tcp" or not parts.hostname:
        raise ValueError(f"{value!r} is not a tcp://HOST:PORT address")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{value!r} has an invalid port") from err
    if port is None:
        raise ValueError(f"{value!r} has no port; write tcp://HOST:PORT")
    return value


Address = Annotated[str, AfterValidator(_tcp_address)]


class ApiConfig(Model):
    """Where the service listens and how much it accepts."""

    bind: Address = "tcp://127.0.0.1:5555"
    events: Address = "tcp://127.0.0.1:5556"
    max_request_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)

    @model_validator(mode="after")
    def _distinct(self) -> ApiConfig:
        if self.bind == self.events:
            raise ValueError("bind and events must be different addresses")
        return self


class ClientKey(Model):
    """One allowed client: a public key file (``clemd keys`` writes it) and a role."""

    name: str = Field(min_length=1, max_length=64)
    public_key_file: ConfigPath
    role: Role


class SecurityConfig(Model):
    """CurveZMQ: required on any non-loopback address, optional on loopback."""

    curve: bool = False
    server_secret_key_file: ConfigPath | None = None
    clients: tuple[ClientKey, ...] = ()

    @model_validator(mode="after")
    def _complete(self) -> SecurityConfig:
        if self.curve and self.server_secret_key_file is None:
            raise ValueError("curve = true needs server_secret_key_file (make one with "
                             "`clemd keys`)")
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ValueError("clients: names must be unique")
        return self


class RunnerConfig(Model):
    """How sessions run, resume and recover."""

    on_restart: Literal["resume", "wait"] = "resume"
    #: A step that was in flight at this many consecutive restarts (it may be what crashes
    #: the service) is not resumed automatically; the session waits for an operator.
    max_auto_resumes: int = Field(default=3, ge=1, le=100)
    watchdog_s: float = Field(default=600.0, gt=0, le=86400)
    watchdog_estimate_factor: float = Field(default=3.0, ge=1.0)
    abort_grace_s: float = Field(default=10.0, gt=0, le=600)
    step_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=5.0, ge=0, le=3600)
    shutdown_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    #: Confirm operator checkpoints ("freeze and load") as soon as a session reaches them.
    #: Only with simulated instruments (nothing to freeze or load): refused otherwise.
    auto_confirm_checkpoints: bool = False


class SimulatedInstrument(Model):
    """A simulated twin on the shared virtual specimen (``[simulation]``)."""

    kind: Literal["simulated"]
    settings: dict[str, Any] = Field(default_factory=dict)


class MicroManagerInstrument(Model):
    """A light microscope through Micro-Manager; ``settings`` as drivers/micromanager wants."""

    kind: Literal["micromanager"]
    settings: dict[str, Any] = Field(default_factory=dict)


class SerialEMInstrument(Model):
    """An electron microscope through SerialEM; ``settings`` as drivers/serialem wants."""

    kind: Literal["serialem"]
    settings: dict[str, Any] = Field(default_factory=dict)


LightConfig = Annotated[SimulatedInstrument | MicroManagerInstrument, Field(discriminator="kind")]
ElectronConfig = Annotated[SimulatedInstrument | SerialEMInstrument, Field(discriminator="kind")]


class SimulationConfig(Model):
    """The virtual specimen shared by simulated instruments (simulators/specimen_config.py)."""

    seed: int = 0
    specimen: dict[str, Any] = Field(default_factory=dict)


class ServiceConfig(Model):
    """The whole config file."""

    schema_version: Literal[1] = 1
    data_dir: ConfigPath
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api: ApiConfig = ApiConfig()
    security: SecurityConfig = SecurityConfig()
    runner: RunnerConfig = RunnerConfig()
    lm: LightConfig | None = None
    em: ElectronConfig | None = None
    simulation: SimulationConfig = SimulationConfig()

    @model_validator(mode="after")
    def _secure_off_loopback(self) -> ServiceConfig:
        for name in ("bind", "events"):
            address = getattr(self.api, name)
            if not is_loopback(address) and not self.security.curve:
                raise ValueError(f"api.{name} {address} is not a loopback address: set "
                                 f"security.curve = true with server_secret_key_file and "
                                 f"security.clients, or bind to 127.0.0.1")
        return self

    @property
    def simulated(self) -> bool:
        """True when every configured instrument is simulated (the service then uses a
        VirtualClock)."""
        kinds = {i.kind for i in (self.lm, self.em) if i is not None}
        return kinds <= {"simulated"}

    def public_view(self) -> dict[str, Any]:
        """The config as the ``config`` method shows it (paths, no key material)."""
        return self.model_dump(mode="json")


def _without_union_tags(loc: list[str]) -> list[str]:
    """Drop pydantic's union-branch tags (e.g. "simulated" in lm.simulated.settings)."""
    return [p for i, p in enumerate(loc)
            if not (i > 0 and loc[i - 1] in ("lm", "em")
                    and p in ("simulated", "micromanager", "serialem"))]


def config_from_mapping(data: dict[str, Any], base_dir: Path | None = None) -> ServiceConfig:
    """Validate parsed TOML; the first failing field names the ConfigError."""
    try:
        cfg = ServiceConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        raise config_error(err, "", _without_union_tags) from err
    _check_auto_confirm(cfg)
    from daemon.instruments import check_settings  # the driver models live with the drivers

    check_settings(cfg)
    return cfg


def _check_auto_confirm(cfg: ServiceConfig) -> None:
    """A checkpoint stands for real work at the bench (plunge-freezing, loading the EM): the
    service may confirm it by itself only when both instruments are simulators."""
    if not cfg.runner.auto_confirm_checkpoints:
        return
    kinds = {"lm": None if cfg.lm is None else cfg.lm.kind,
             "em": None if cfg.em is None else cfg.em.kind}
    real = {k: v for k, v in kinds.items() if v != "simulated"}
    if real:
        raise ConfigError("runner.auto_confirm_checkpoints",
                          "true needs both instruments simulated (an operator must freeze "
                          "and load a real grid); got " + ", ".join(
                              f"{k}.kind = {v!r}" if v else f"no [{k}]" for k, v in
                              real.items()) + "; set it to false and confirm with "
                          "`clemctl confirm`")


def load_config(path: Path) -> ServiceConfig:
    """Read and validate a TOML config file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(str(path), "config file does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(str(path), f"cannot read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), f"not valid TOML: {err}") from err
    return config_from_mapping(data, base_dir=path.resolve().parent)
