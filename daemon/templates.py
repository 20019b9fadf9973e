"""Session templates: a name, a params model, and a factory that builds the plan.

Templates come from an explicit table of modules (``TEMPLATE_MODULES``). Each module defines
``clemd_templates()`` returning ``(name, params_model, factory, instruments, description)``
tuples, where ``factory(params, env)`` builds a ``protocols.plan.Plan`` and ``env`` has
``session_id``, ``data_dir`` and ``targets()`` (the session's committed targets as dicts).
Protocol modules therefore plug in by name without importing the daemon. A module that is
not there yet is simply absent; one that fails to import is listed as unavailable with its
error (``status`` shows it), so one broken protocol does not stop the service.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ValidationError

from daemon.errors import BadRequest, NotFound
from protocols.plan import Plan

log = structlog.get_logger(__name__)

#: Modules that contribute templates, in order. Issue 7 adds the AutoCLEM session here.
TEMPLATE_MODULES: tuple[str, ...] = (
    "daemon.exercise",
    "protocols.templates",
)


@dataclass(frozen=True)
class SessionEnv:
    """What a template factory may know about its session."""

    session_id: str
    data_dir: Path
    targets: Callable[[], list[dict[str, Any]]]


Factory = Callable[[Any, SessionEnv], Plan]
InstrumentsFor = frozenset[str] | Callable[[Any], frozenset[str]]


@dataclass(frozen=True)
class Template:
    name: str
    params_model: type[BaseModel]
    factory: Factory
    instruments: InstrumentsFor
    description: str = ""

    def instruments_for(self, params: BaseModel) -> frozenset[str]:
        """The instruments a session of this template holds while it runs."""
        if callable(self.instruments):
            return frozenset(self.instruments(params))
        return frozenset(self.instruments)


@dataclass
class TemplateRegistry:
    """Templates by name; one registry per service (tests build their own)."""

    templates: dict[str, Template] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)   # module -> import error

    def register(self, name: str, params_model: type[BaseModel], factory: Factory,
                 instruments: InstrumentsFor = frozenset({"lm", "em"}),
                 description: str = "") -> None:
        if name in self.templates:
            raise ValueError(f"template {name!r} registered twice")
        self.templates[name] = Template(name, params_model, factory, instruments, description)

    def get(self, name: str) -> Template:
        try:
            return self.templates[name]
        except KeyError:
            raise NotFound(f"template {name!r} does not exist; templates: "
                           f"{sorted(self.templates)}") from None

    def validate(self, name: str, params: dict[str, Any]) -> BaseModel:
        """Params checked by the template's model; errors name the field."""
        template = self.get(name)
        try:
            return template.params_model.model_validate_json(json.dumps(params), strict=True)
        except ValidationError as err:
            problems = "; ".join(
                f"params.{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                for e in err.errors(include_url=False))
            raise BadRequest(f"template {name}: {problems}") from err

    def load_module(self, module_name: str) -> None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                return    # not written yet: nothing to register
            self._broken(module_name, err)
            return
        except Exception as err:  # noqa: BLE001 - a broken protocol module is reported, not fatal
            self._broken(module_name, err)
            return
        entries: Iterable[tuple[Any, ...]] = module.clemd_templates()
        for entry in entries:
            self.register(*entry)

    def _broken(self, module_name: str, err: BaseException) -> None:
        self.unavailable[module_name] = f"{type(err).__name__}: {err}"
        log.error("templates.module_broken", module=module_name, error=str(err))


def default_registry(modules: Iterable[str] = TEMPLATE_MODULES) -> TemplateRegistry:
    registry = TemplateRegistry()
    for module_name in modules:
        registry.load_module(module_name)
    return registry
