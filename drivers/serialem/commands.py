"""SerialEM's script-command table: name -> wire index, whether it may be sent, its arguments.

The table is commands.tsv (a copy of the shared one, shipped in the package), read with
importlib.resources so it works from an installed wheel. Every argument is checked against
the command's arg keys here, before a byte is sent: a wrong count or type would otherwise
reach SerialEM as an empty or truncated slot and fail, or worse, run with a default.

Arg keys (doc section 3): S/D/I required string/double/int, s/d/i optional. Like the
compiled module, everything after the first lower-case key is optional, and optional
arguments end at the first omitted one (Python positional arguments do that by nature).

SerialEM command names appear only in this module and in the table.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources

from drivers.errors import ClemdError
from drivers.serialem.wire import (
    MAX_ARGS,
    MAX_REQUEST_BYTES,
    RegularRequest,
    WireArg,
    WireLimitExceeded,
    c_atof,
    encode_request,
    format_double,
    format_int,
)

EXIT_COMMAND = "Exit"
"""``Exit 1`` ends external control without an exception (doc section 4)."""

# Calls that only read state: they get the client's status timeout. Everything else
# (Record, Montage, AutoFocus, TiltTo, ...) may legitimately run for many minutes.
_STATUS_PREFIXES = ("Report", "Is", "Are", "Get")
_STATUS_NAMES = frozenset({"DewarsRemainingTime", "NavIndexWithLabel", "Echo"})

_INT32 = (-(2**31), 2**31 - 1)

ArgValue = str | float | int


class CommandRefused(ClemdError, ValueError):
    """A command was refused before anything was sent; the same call would fail again."""


class UnknownCommand(CommandRefused, LookupError):
    """The name is not in SerialEM's command table (misspelt, or newer than the table)."""


class NotExternalCommand(CommandRefused):
    """The command exists but SerialEM does not accept it from an external client."""


class ArgumentError(CommandRefused, TypeError):
    """Wrong number or type of arguments for the command's arg keys, or a request too long."""


@dataclass(frozen=True)
class CommandSpec:
    """One row of commands.tsv."""

    name: str
    index: int
    min_args: int
    external: bool
    arg_keys: str

    @property
    def required(self) -> int:
        """Arguments that must be given: the keys before the first optional (lower-case) one."""
        for i, key in enumerate(self.arg_keys):
            if key.islower():
                return i
        return len(self.arg_keys)

    @property
    def signature(self) -> str:
        names = {"S": "str", "D": "float", "I": "int"}
        parts = [names[k.upper()] + ("" if k.isupper() else "?") for k in self.arg_keys]
        return f"{self.name}({', '.join(parts)})"


class CommandTable:
    """Look-ups and argument checks over the command table."""

    def __init__(self, specs: Iterable[CommandSpec]) -> None:
        self._by_name: dict[str, CommandSpec] = {}
        self._by_index: dict[int, CommandSpec] = {}
        for spec in specs:
            if spec.name in self._by_name or spec.index in self._by_index:
                raise ValueError(f"duplicate command {spec.name} / index {spec.index}")
            if any(k not in "SDIsdi" for k in spec.arg_keys) or len(spec.arg_keys) > MAX_ARGS:
                raise ValueError(f"bad arg keys {spec.arg_keys!r} for {spec.name}")
            self._by_name[spec.name] = spec
            self._by_index[spec.index] = spec

    @classmethod
    def load(cls) -> CommandTable:
        """The table shipped in the package (drivers/serialem/commands.tsv)."""
        text = resources.files("drivers.serialem").joinpath("commands.tsv").read_text("utf-8")
        return cls.parse(text)

    @classmethod
    def parse(cls, text: str) -> CommandTable:
        rows = csv.DictReader(io.StringIO(text), delimiter="\t")
        return cls(CommandSpec(name=r["name"], index=int(r["index"]),
                               min_args=int(r["min_args"]), external=r["external"] == "yes",
                               arg_keys=r["arg_keys"] or "") for r in rows)

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def spec(self, name: str) -> CommandSpec:
        """The row for ``name``; raises UnknownCommand."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownCommand(f"{name!r} is not a SerialEM command "
                                 f"(drivers/serialem/commands.tsv)") from None

    def by_index(self, index: int) -> CommandSpec:
        """The row for a wire index (server side); raises UnknownCommand."""
        try:
            return self._by_index[index]
        except KeyError:
            raise UnknownCommand(f"no SerialEM command has index {index}") from None

    def external(self, name: str) -> CommandSpec:
        """The row for ``name`` if SerialEM accepts it externally; else raises."""
        spec = self.spec(name)
        if not spec.external:
            raise NotExternalCommand(f"{name} is a script-only command; SerialEM refuses it "
                                     f"from an external client")
        return spec

    def is_status(self, name: str) -> bool:
        """True for quick read-only calls, which get a reply timeout."""
        return name.startswith(_STATUS_PREFIXES) or name in _STATUS_NAMES

    def prepare(self, name: str, args: Sequence[object]) -> RegularRequest:
        """The request for ``name(*args)`` after every check; raises CommandRefused kinds."""
        spec = self.external(name)
        keys = spec.arg_keys
        if not spec.required <= len(args) <= len(keys):
            want = (f"{spec.required}" if spec.required == len(keys)
                    else f"{spec.required} to {len(keys)}")
            raise ArgumentError(f"{spec.signature} takes {want} arguments, got {len(args)}")
        wire = tuple(_to_wire(spec, i, key, value)
                     for i, (key, value) in enumerate(zip(keys, args, strict=False)))
        request = RegularRequest(spec.index, wire)
        try:
            encode_request(request)
        except WireLimitExceeded as err:
            raise ArgumentError(f"{name}: {err} (limit {MAX_REQUEST_BYTES} bytes)") from err
        return request

    def interpret(self, request: RegularRequest) -> tuple[CommandSpec, tuple[ArgValue, ...]]:
        """Server side: the command and its arguments as Python values, read as SerialEM does.

        Strings are the slot text, doubles the slot double, ints the double truncated.
        Unknown indices raise UnknownCommand.
        """
        spec = self.by_index(request.command_index)
        values: list[ArgValue] = []
        for i, arg in enumerate(request.args):
            key = spec.arg_keys[i].upper() if i < len(spec.arg_keys) else "S"
            if key == "S":
                values.append(arg.text)
            elif key == "D":
                values.append(arg.number)
            else:
                values.append(math.trunc(arg.number) if math.isfinite(arg.number) else 0)
        return spec, tuple(values)


def _to_wire(spec: CommandSpec, i: int, key: str, value: object) -> WireArg:
    where = f"{spec.signature} argument {i + 1}"
    kind = key.upper()
    if kind == "S":
        if not isinstance(value, str):
            raise ArgumentError(f"{where} must be str, got {type(value).__name__}")
        if "\0" in value:
            raise ArgumentError(f"{where} contains a NUL character")
        if key == "S" and not value:
            raise ArgumentError(f"{where} is required and may not be empty "
                                f"(SerialEM reads an empty string as omitted)")
        return WireArg(value, c_atof(value))
    if kind == "D":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ArgumentError(f"{where} must be a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number):
            raise ArgumentError(f"{where} must be finite, got {number}")
        return WireArg(format_double(number), number)
    if not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{where} must be int, got {type(value).__name__}")
    integer = int(value)
    if not _INT32[0] <= integer <= _INT32[1]:
        raise ArgumentError(f"{where} {integer} does not fit a 32-bit int")
    return WireArg(format_int(integer), float(integer))
