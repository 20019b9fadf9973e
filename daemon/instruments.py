"""Build the configured instruments: one function per kind, each importing its driver lazily.

A kind whose driver is not installed (or not written yet) fails at start with
``InstrumentUnavailable("driver X not available: ...")``; it never falls back to anything
else. With only simulated instruments the service runs on a ``VirtualClock`` (sessions at
compute speed); with any real instrument on a ``RealClock``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel, ValidationError

from daemon.errors import InstrumentUnavailable
from drivers.base import ElectronMicroscope, LightMicroscope
from drivers.clock import Clock, RealClock, VirtualClock
from drivers.errors import ClemdError, ConfigError

if TYPE_CHECKING:
    from daemon.config import ServiceConfig

log = structlog.get_logger(__name__)

Instrument = LightMicroscope | ElectronMicroscope

#: Where each driver's settings model lives: (role, kind) -> (module, class). A driver whose
#: module is missing keeps its settings as an unchecked table and fails at start instead.
SETTINGS_MODELS: dict[tuple[str, str], tuple[str, str]] = {
    ("lm", "micromanager"): ("drivers.micromanager_config", "MicroManagerConfig"),
    ("em", "serialem"): ("drivers.serialem.config", "SerialEMConfig"),
}


@dataclass
class Instruments:
    """The instruments of one service run and the clock they share."""

    clock: Clock
    lm: LightMicroscope | None = None
    em: ElectronMicroscope | None = None
    kinds: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)   # e.g. the simulated specimen

    def get(self, name: str) -> Instrument | None:
        return {"lm": self.lm, "em": self.em}.get(name)

    def names(self) -> list[str]:
        return [n for n in ("lm", "em") if self.get(n) is not None]

    def close(self) -> list[str]:
        """Close every instrument, each even if another failed; return the failures.

        Called at shutdown, when nothing more can be done about an instrument that cannot
        be reached: each failure is logged at error level and returned to the caller.
        """
        failures = []
        for name in ("lm", "em"):
            inst = self.get(name)
            if inst is None:
                continue
            try:
                inst.close()
            except ClemdError as err:
                log.error("instrument.close_failed", instrument=name, error=str(err),
                          error_type=type(err).__name__)
                failures.append(f"{name}: {err}")
        return failures


def _import(module: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise InstrumentUnavailable(f"driver {what} not available: {err}") from err


def _settings_model(role: str, kind: str) -> type[BaseModel] | None:
    target = SETTINGS_MODELS.get((role, kind))
    if target is None:
        return None
    try:
        module = importlib.import_module(target[0])
    except ImportError:
        return None
    model = getattr(module, target[1], None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _validated(role: str, kind: str, settings: dict[str, Any]) -> BaseModel | None:
    model = _settings_model(role, kind)
    if model is None:
        return None
    try:
        return model.model_validate(settings)
    except ValidationError as err:
        problems = err.errors(include_url=False)
        where = ".".join([role, "settings", *(str(p) for p in problems[0]["loc"])])
        raise ConfigError(where, "; ".join(str(p["msg"]) for p in problems)) from err


def check_settings(cfg: ServiceConfig) -> None:
    """Validate instrument settings with their drivers' models where those exist."""
    for role in ("lm", "em"):
        inst = getattr(cfg, role)
        if inst is None:
            continue
        if inst.kind == "simulated":
            _sim_config(cfg, role, inst.settings, required=False)
        else:
            _validated(role, inst.kind, inst.settings)
    if any(i is not None and i.kind == "simulated" for i in (cfg.lm, cfg.em)):
        _specimen_config(cfg)


#: The simulators' own config models: role -> (module, class). ``seed`` in the settings
#: defaults to ``simulation.seed``.
SIM_CONFIGS = {"lm": ("simulators.light_config", "LightSimConfig"),
               "em": ("simulators.electron_config", "ElectronSimConfig")}


def _sim_config(cfg: ServiceConfig, role: str, settings: dict[str, Any],
                required: bool = True) -> tuple[Any, int]:
    values = dict(settings)
    seed = int(values.pop("seed", cfg.simulation.seed))
    module_name, cls_name = SIM_CONFIGS[role]
    try:
        model = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        if required:
            raise InstrumentUnavailable(f"driver simulated ({role}) not available: "
                                        f"{err}") from err
        return None, seed
    if role == "em":
        values.setdefault("seed", seed)
    return model.build(prefix=f"{role}.settings", **values), seed


def _specimen_config(cfg: ServiceConfig) -> Any:
    try:
        from simulators.specimen_config import SpecimenConfig
    except ImportError as err:
        raise InstrumentUnavailable(f"driver simulated not available: {err}") from err
    values = {"seed": cfg.simulation.seed, **cfg.simulation.specimen}
    return SpecimenConfig.build(prefix="simulation.specimen", **values)


# --------------------------------------------------------------------------- builders


def _simulated_lm(cfg: ServiceConfig, settings: dict[str, Any], clock: Clock,
                  shared: dict[str, Any]) -> LightMicroscope:
    module = _import("simulators.light", "simulated (simulators/light.py)")
    sim_cfg, seed = _sim_config(cfg, "lm", settings)
    built: LightMicroscope = module.SimulatedLightMicroscope(_specimen(cfg, shared), clock,
                                                             sim_cfg, seed=seed)
    return built


def _simulated_em(cfg: ServiceConfig, settings: dict[str, Any], clock: Clock,
                  shared: dict[str, Any]) -> ElectronMicroscope:
    module = _import("simulators.electron", "simulated (simulators/electron.py)")
    sim_cfg, _ = _sim_config(cfg, "em", settings)
    built: ElectronMicroscope = module.SimulatedElectronMicroscope(_specimen(cfg, shared), clock,
                                                                   sim_cfg)
    return built


def _specimen(cfg: ServiceConfig, shared: dict[str, Any]) -> Any:
    if "specimen" not in shared:
        from simulators.specimen import Specimen

        shared["specimen"] = Specimen.generate(_specimen_config(cfg))
    return shared["specimen"]


def _micromanager_lm(cfg: ServiceConfig, settings: dict[str, Any], clock: Clock,
                     shared: dict[str, Any]) -> LightMicroscope:
    module = _import("drivers.micromanager", "micromanager (drivers/micromanager.py)")
    model = _validated("lm", "micromanager", settings)
    if model is None:
        raise InstrumentUnavailable("driver micromanager not available: its settings model "
                                    "(drivers/micromanager_config.py) cannot be imported")
    try:
        built: LightMicroscope = module.MicroManagerLightMicroscope.from_config(
            model, clock, prefix="lm.settings")
    except ConfigError:
        raise
    except ClemdError as err:
        raise InstrumentUnavailable(f"lm (micromanager) cannot be opened: {err}") from err
    return built


def _serialem_em(cfg: ServiceConfig, settings: dict[str, Any], clock: Clock,
                 shared: dict[str, Any]) -> ElectronMicroscope:
    """The SerialEM link connects on its first call, so a SerialEM that is not running yet
    does not stop the service: the first step fails with ConnectionLost and is retried."""
    module = _import("drivers.serialem.microscope", "serialem (drivers/serialem/)")
    model = _validated("em", "serialem", settings)
    if model is None:
        raise InstrumentUnavailable("driver serialem not available: its settings model "
                                    "(drivers/serialem/config.py) cannot be imported")
    try:
        built: ElectronMicroscope = module.SerialEMElectronMicroscope.from_config(model,
                                                                                  clock=clock)
    except ConfigError:
        raise
    except ClemdError as err:
        raise InstrumentUnavailable(f"em (serialem) cannot be opened: {err}") from err
    return built


Builder = Callable[["ServiceConfig", dict[str, Any], Clock, dict[str, Any]], Any]

BUILDERS: dict[tuple[str, str], Builder] = {
    ("lm", "simulated"): _simulated_lm,
    ("em", "simulated"): _simulated_em,
    ("lm", "micromanager"): _micromanager_lm,
    ("em", "serialem"): _serialem_em,
}


def build_instruments(cfg: ServiceConfig, virtual_start_s: float = 0.0) -> Instruments:
    """Build every configured instrument; on any failure close those already built.

    ``virtual_start_s`` starts the VirtualClock of a simulated setup where the last run's
    committed steps left it, so simulated time never runs backwards across a restart.
    """
    clock: Clock = VirtualClock(virtual_start_s) if cfg.simulated else RealClock()
    out = Instruments(clock=clock)
    try:
        for role in ("lm", "em"):
            inst_cfg = getattr(cfg, role)
            if inst_cfg is None:
                continue
            builder = BUILDERS[(role, inst_cfg.kind)]
            built = builder(cfg, dict(inst_cfg.settings), clock, out.extra)
            setattr(out, role, built)
            out.kinds[role] = inst_cfg.kind
            log.info("instrument.built", instrument=role, kind=inst_cfg.kind)
    except BaseException:
        out.close()
        raise
    return out
