"""SerialEM navigator files (.nav): read, edit and write, in the autodoc and the XML form.

A navigator file carries the targets from correlation to SerialEM, and the maps and
registration points from SerialEM back. SerialEM adds keys with every version, so this module
never interprets more than it must: every section keeps its keys in file order with their raw
value strings, and a value is re-formatted only when it is changed. Unknown keys and untouched
values therefore round-trip byte for byte. Typed accessors read the keys the doc describes
(section 7 of docs/serialem-socket-protocol.md).

Everything is immutable: edits return new objects (``with_value``, ``with_item``,
``add_point``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path
from typing import Literal, Self
from xml.etree import ElementTree
from xml.sax.saxutils import escape, quoteattr

import numpy as np
from numpy.typing import ArrayLike, NDArray

from drivers.base import NavItem
from drivers.errors import ClemdError

ITEM = "Item"
FIRST_NEW_MAP_ID = 100000
_MAX_MAP_ID = 2**31 - 1
_COMMENT = "#"
_HEADER = re.compile(r"^\[\s*([^\s=\]]+)\s*=\s*(.*?)\s*\]\s*$")


class NavFileError(ClemdError, ValueError):
    """A navigator file is malformed, or an item lacks a key the request needs."""


class ItemType(IntEnum):
    POINT = 0
    POLYGON = 1
    MAP = 2


def format_float(value: float) -> str:
    """A float as SerialEM writes navigator values: 6 significant digits."""
    text = f"{float(value):.6g}"
    return "0" if text == "-0" else text


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return format_float(float(value))
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise NavFileError(f"navigator values are single lines, got {value!r}")
        return value
    if isinstance(value, Iterable):
        return " ".join(_format(v) for v in value)
    raise NavFileError(f"cannot write {type(value).__name__} as a navigator value")


@dataclass(frozen=True, kw_only=True)
class Section:
    """``[kind = name]`` and its ``key = value`` lines, in file order, values raw.

    Comment lines are kept as entries whose key is ``#`` and whose value is the whole line.
    """

    kind: str
    name: str
    entries: tuple[tuple[str, str], ...] = ()

    # -- raw access --------------------------------------------------------------------------

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.entries:
            if k == key:
                return v
        return default

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self.entries)

    def keys(self) -> list[str]:
        return [k for k, _ in self.entries if k != _COMMENT]

    def raw(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise NavFileError(f"[{self.kind} = {self.name}] has no {key}")
        return value

    def with_value(self, key: str, value: object) -> Self:
        """A copy with ``key`` set (in place if present, else appended); typed values are
        formatted as SerialEM writes them, strings are written as given."""
        text = _format(value)
        if key in self:
            entries = tuple((k, text if k == key else v) for k, v in self.entries)
        else:
            entries = (*self.entries, (key, text))
        return replace(self, entries=entries)

    def without(self, key: str) -> Self:
        return replace(self, entries=tuple(e for e in self.entries if e[0] != key))

    # -- typed access ------------------------------------------------------------------------

    def floats(self, key: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in self.raw(key).split())
        except ValueError as err:
            raise NavFileError(f"[{self.kind} = {self.name}] {key}: {err}") from err

    def ints(self, key: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in self.raw(key).split())
        except ValueError as err:
            raise NavFileError(f"[{self.kind} = {self.name}] {key}: {err}") from err

    def int_value(self, key: str, default: int | None = None) -> int:
        if default is not None and key not in self:
            return default
        values = self.ints(key)
        if len(values) != 1:
            raise NavFileError(f"[{self.kind} = {self.name}] {key} holds {len(values)} values")
        return values[0]


@dataclass(frozen=True, kw_only=True)
class NavigatorItem(Section):
    """An ``[Item = label]`` section with the typed keys a CLEM workflow needs."""

    kind: str = ITEM

    @property
    def label(self) -> str:
        return self.name

    @property
    def type(self) -> ItemType:
        return ItemType(self.int_value("Type"))

    @property
    def map_id(self) -> int:
        return self.int_value("MapID")

    @property
    def color(self) -> int:
        return self.int_value("Color", 0)

    @property
    def regis(self) -> int:
        return self.int_value("Regis", 1)

    @property
    def reg_pt(self) -> int:
        """Registration-point number; > 0 marks a registration point."""
        return self.int_value("RegPt", 0)

    @property
    def acquire(self) -> bool:
        return self.int_value("Acquire", 0) != 0

    @property
    def note(self) -> str:
        return self.get("Note") or ""

    @property
    def drawn_id(self) -> int | None:
        return self.int_value("DrawnID") if "DrawnID" in self else None

    @property
    def group_id(self) -> int | None:
        return self.int_value("GroupID") if "GroupID" in self else None

    @property
    def stage_xyz(self) -> tuple[float, float, float]:
        v = self.floats("StageXYZ")
        if len(v) != 3:
            raise NavFileError(f"[Item = {self.name}] StageXYZ holds {len(v)} values")
        return v[0], v[1], v[2]

    @property
    def points(self) -> NDArray[np.float64]:
        """Outline points (NumPts x 2), stage micrometres."""
        xs, ys = self.floats("PtsX"), self.floats("PtsY")
        n = self.int_value("NumPts", len(xs))
        if not len(xs) == len(ys) == n:
            raise NavFileError(f"[Item = {self.name}] NumPts {n} but {len(xs)} PtsX and "
                               f"{len(ys)} PtsY")
        return np.column_stack([xs, ys]).astype(np.float64).reshape(n, 2)

    def to_nav_item(self) -> NavItem:
        """The contract's view of this item (drivers/base.py); ``item_id`` is the MapID."""
        return NavItem(item_id=self.map_id, label=self.label, stage_um=self.stage_xyz,
                       kind=self.type.name.lower(), note=self.note, acquire=self.acquire)

    # -- maps --------------------------------------------------------------------------------

    @property
    def map_scale_mat(self) -> NDArray[np.float64]:
        """2x2 stage-to-pixel matrix [[xpx, xpy], [ypx, ypy]] (MapScaleMat, in file order)."""
        v = self.floats("MapScaleMat")
        if len(v) != 4:
            raise NavFileError(f"[Item = {self.name}] MapScaleMat holds {len(v)} values")
        return np.array(v, dtype=np.float64).reshape(2, 2)

    @property
    def map_width_height(self) -> tuple[int, int]:
        w, h = self.ints("MapWidthHeight")
        return w, h

    def stage_to_pixel_affine(self) -> NDArray[np.float64]:
        """2x3 affine of pixel = M (stage - map StageXY) + (W/2, H/2) (doc section 7)."""
        m = self.map_scale_mat
        x0, y0, _ = self.stage_xyz
        w, h = self.map_width_height
        offset = np.array([w / 2.0, h / 2.0]) - m @ np.array([x0, y0])
        return np.hstack([m, offset[:, None]])

    def pixel_to_stage_affine(self) -> NDArray[np.float64]:
        """Inverse of ``stage_to_pixel_affine``: usable with drivers.imaging.apply_affine."""
        a = self.stage_to_pixel_affine()
        try:
            inv = np.linalg.inv(a[:, :2])
        except np.linalg.LinAlgError as err:
            raise NavFileError(f"[Item = {self.name}] MapScaleMat is singular") from err
        return np.hstack([inv, (-inv @ a[:, 2])[:, None]])

    def stage_to_pixel(self, stage_xy: ArrayLike) -> NDArray[np.float64]:
        """Map pixel (x, y) of stage micrometres; (N, 2) or (2,)."""
        a = self.stage_to_pixel_affine()
        return np.asarray(stage_xy, dtype=float) @ a[:, :2].T + a[:, 2]

    def pixel_to_stage(self, pixel_xy: ArrayLike) -> NDArray[np.float64]:
        """Stage micrometres of map pixels (x, y); (N, 2) or (2,)."""
        a = self.pixel_to_stage_affine()
        return np.asarray(pixel_xy, dtype=float) @ a[:, :2].T + a[:, 2]


@dataclass(frozen=True)
class NavigatorFile:
    """A whole .nav file: global lines, then sections (items and trailing ones)."""

    header: tuple[tuple[str, str], ...] = (("AdocVersion", "2.00"),)
    sections: tuple[Section, ...] = ()
    newline: str = "\n"
    form: Literal["autodoc", "xml"] = "autodoc"

    @property
    def items(self) -> list[NavigatorItem]:
        return [s for s in self.sections if isinstance(s, NavigatorItem)]

    def __iter__(self) -> Iterator[NavigatorItem]:
        return iter(self.items)

    def item(self, label: str) -> NavigatorItem:
        for it in self.items:
            if it.label == label:
                return it
        raise NavFileError(f"no navigator item labelled {label!r}")

    def by_map_id(self, map_id: int) -> NavigatorItem:
        for it in self.items:
            if "MapID" in it and it.map_id == map_id:
                return it
        raise NavFileError(f"no navigator item with MapID {map_id}")

    def maps(self) -> list[NavigatorItem]:
        return [it for it in self.items if it.type == ItemType.MAP]

    def registration_points(self, regis: int) -> dict[int, NavigatorItem]:
        """RegPt number -> item, for the registration points of registration ``regis``."""
        out: dict[int, NavigatorItem] = {}
        for it in self.items:
            if it.regis == regis and it.reg_pt > 0:
                if it.reg_pt in out:
                    raise NavFileError(f"registration {regis} has two items with RegPt "
                                       f"{it.reg_pt}: {out[it.reg_pt].label!r}, {it.label!r}")
                out[it.reg_pt] = it
        return out

    def registration_pairs(self, from_regis: int, to_regis: int
                           ) -> list[tuple[int, NavigatorItem, NavigatorItem]]:
        """Items paired by equal RegPt across two registrations, as SerialEM pairs them."""
        a, b = self.registration_points(from_regis), self.registration_points(to_regis)
        return [(n, a[n], b[n]) for n in sorted(a.keys() & b.keys())]

    def with_item(self, item: NavigatorItem, *, label: str | None = None) -> NavigatorFile:
        """Replace the item labelled ``label`` (default: ``item.label``), or append it."""
        target = item.label if label is None else label
        sections = list(self.sections)
        for i, s in enumerate(sections):
            if isinstance(s, NavigatorItem) and s.label == target:
                sections[i] = item
                return replace(self, sections=tuple(sections))
        # new items go after the last item, before trailing sections such as MontParam
        last = max((i for i, s in enumerate(sections) if isinstance(s, NavigatorItem)),
                   default=-1)
        sections.insert(last + 1, item)
        return replace(self, sections=tuple(sections))

    def unique_map_id(self) -> int:
        """A MapID no item uses, >= 100000 as SerialEM requires of new items."""
        used = {it.map_id for it in self.items if "MapID" in it}
        candidate = max(max(used, default=0) + 1, FIRST_NEW_MAP_ID)
        if candidate > _MAX_MAP_ID:
            candidate = next(i for i in range(FIRST_NEW_MAP_ID, _MAX_MAP_ID) if i not in used)
        return candidate

    def next_label(self) -> str:
        numbers = [int(it.label) for it in self.items if it.label.isdigit()]
        return str(max(numbers, default=0) + 1)

    def add_point(self, x_um: float, y_um: float, z_um: float = 0.0, *,
                  label: str | None = None, note: str = "", acquire: bool = False,
                  regis: int = 1, color: int = 0, reg_pt: int = 0,
                  drawn_id: int | None = None, group_id: int | None = None,
                  ) -> tuple[NavigatorFile, NavigatorItem]:
        """A new point item with a unique MapID, appended after the last item."""
        label = self.next_label() if label is None else label
        if any(it.label == label for it in self.items):
            raise NavFileError(f"navigator already has an item labelled {label!r}")
        item = NavigatorItem(name=label)
        values: list[tuple[str, object]] = [
            ("Color", color), ("StageXYZ", (float(x_um), float(y_um), float(z_um))),
            ("NumPts", 1), ("Regis", regis), ("Type", int(ItemType.POINT))]
        if reg_pt:
            values.append(("RegPt", reg_pt))
        if note:
            values.append(("Note", note))
        if group_id is not None:
            values.append(("GroupID", group_id))
        if acquire:
            values.append(("Acquire", 1))
        if drawn_id is not None:
            values.append(("DrawnID", drawn_id))
        values += [("MapID", self.unique_map_id()), ("PtsX", float(x_um)),
                   ("PtsY", float(y_um))]
        for key, value in values:
            item = item.with_value(key, value)
        return self.with_item(item), item


# --------------------------------------------------------------------------- reading


def _section(kind: str, name: str, entries: Sequence[tuple[str, str]]) -> Section:
    if kind == ITEM:
        return NavigatorItem(name=name, entries=tuple(entries))
    return Section(kind=kind, name=name, entries=tuple(entries))


def loads(text: str) -> NavigatorFile:
    """Parse either form; the XML form is recognised by its leading ``<``."""
    if text.lstrip("\ufeff \t\r\n").startswith("<"):
        return _loads_xml(text)
    return _loads_autodoc(text)


def _loads_autodoc(text: str) -> NavigatorFile:
    newline = "\r\n" if "\r\n" in text else "\n"
    header: list[tuple[str, str]] = []
    sections: list[Section] = []
    current: tuple[str, str] | None = None
    entries: list[tuple[str, str]] = header
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(_COMMENT):
            entries.append((_COMMENT, line))
            continue
        m = _HEADER.match(stripped)
        if m:
            if current is not None:
                sections.append(_section(*current, entries))
            current, entries = (m.group(1), m.group(2)), []
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise NavFileError(f"line {number}: expected 'key = value' or '[Kind = name]', "
                               f"got {line!r}")
        entries.append((key.strip(), value.strip()))
    if current is not None:
        sections.append(_section(*current, entries))
    return NavigatorFile(header=tuple(header), sections=tuple(sections), newline=newline,
                         form="autodoc")


def _loads_xml(text: str) -> NavigatorFile:
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as err:
        raise NavFileError(f"navigator XML: {err}") from err
    if root.tag != "navigator":
        raise NavFileError(f"navigator XML root is <{root.tag}>, expected <navigator>")
    header: list[tuple[str, str]] = []
    sections: list[Section] = []
    for child in root:
        entries = [(e.tag, (e.text or "").strip()) for e in child]
        if child.tag == "PreData":
            header.extend(entries)
            continue
        if "name" not in child.attrib:
            raise NavFileError(f"navigator XML <{child.tag}> has no name attribute")
        sections.append(_section(child.tag, child.attrib["name"], entries))
    return NavigatorFile(header=tuple(header), sections=tuple(sections), form="xml")


def read(path: str | Path) -> NavigatorFile:
    """Read a .nav file; bytes that are not UTF-8 survive (surrogateescape)."""
    raw = Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    return loads(raw)


# --------------------------------------------------------------------------- writing


def dumps(nav: NavigatorFile, form: Literal["autodoc", "xml"] | None = None) -> str:
    """The file text in ``form`` (default: the form it was read in)."""
    if (form or nav.form) == "xml":
        return _dumps_xml(nav)
    return _dumps_autodoc(nav)


def _entry_lines(entries: Iterable[tuple[str, str]]) -> list[str]:
    return [v if k == _COMMENT else f"{k} = {v}" for k, v in entries]


def _dumps_autodoc(nav: NavigatorFile) -> str:
    lines = _entry_lines(nav.header)
    for s in nav.sections:
        lines += ["", f"[{s.kind} = {s.name}]", *_entry_lines(s.entries)]
    return nav.newline.join(lines) + nav.newline


def _dumps_xml(nav: NavigatorFile) -> str:
    def block(tag: str, attrs: str, entries: Iterable[tuple[str, str]]) -> list[str]:
        body = [f"<{k}>{escape(v)}</{k}>" for k, v in entries if k != _COMMENT]
        return [f"<{tag}{attrs}>", *body, f"</{tag}>"]

    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<navigator>"]
    lines += block("PreData", "", nav.header)
    for s in nav.sections:
        lines += block(s.kind, f" name={quoteattr(s.name)}", s.entries)
    lines.append("</navigator>")
    return nav.newline.join(lines) + nav.newline


def write(path: str | Path, nav: NavigatorFile,
          form: Literal["autodoc", "xml"] | None = None) -> None:
    """Write ``nav`` so SerialEM can read it (a temporary file, then an atomic rename)."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(dumps(nav, form).encode("utf-8", errors="surrogateescape"))
    tmp.replace(target)


__all__ = ["FIRST_NEW_MAP_ID", "ITEM", "ItemType", "NavFileError", "NavigatorFile",
           "NavigatorItem", "Section", "dumps", "format_float", "loads", "read", "write"]
