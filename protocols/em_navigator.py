"""A SerialEM navigator file holding the EM atlas and square maps as maps and the targets as
points to acquire, so that an operator (or SerialEM's own Acquire at Items) can take over.

Uses drivers/serialem/navigator.py, which is the .nav file format (read, edit, write), not a
driver: it talks to no instrument, so a protocol may use it without tying itself to SerialEM.

Map items carry ``MapScaleMat`` and ``StageXYZ`` such that SerialEM's rule (docs
serialem-socket-protocol.md section 7) ``pixel = M (stage - StageXY) + (W/2, H/2)`` gives the
same pixel as our mosaic affine: M is the inverse of the affine's linear part and StageXY is
the stage position of pixel (W/2, H/2). Points are drawn on the map they were picked on
(``DrawnID``) and marked ``Acquire = 1``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from drivers.base import LimitViolation
from drivers.serialem.navigator import ItemType, NavigatorFile, NavigatorItem, write
from protocols.em_atlas import ATLAS_KEY
from protocols.em_montage import read_map_sidecar
from protocols.em_params import FrozenParams
from protocols.lm_io import artifact
from protocols.plan import Plan, Step, StepContext, StepResult
from protocols.square_map import map_key

__all__ = ["EMNavigatorParams", "EMNavigatorPlan", "NavMap", "NavTarget", "build_navigator"]

MAP_COLOR, TARGET_COLOR = 2, 0   # blue maps, red points, as SerialEM colours them


@dataclass(frozen=True)
class NavMap:
    """A stitched map for the navigator: its label, file (relative to the .nav) and result."""

    label: str
    map_file: str
    result: dict[str, Any]


@dataclass(frozen=True)
class NavTarget:
    """A target point (EM stage um) and the label of the map it was picked on, if any."""

    label: str
    x_um: float
    y_um: float
    z_um: float = 0.0
    map_label: str | None = None
    note: str = ""


def _map_item(nav: NavigatorFile, m: NavMap) -> tuple[NavigatorFile, NavigatorItem]:
    a = np.asarray(m.result["pixel_to_stage"], dtype=float)
    h, w = (int(v) for v in m.result["shape"])
    linear = a[:, :2]
    stage_xy = linear @ np.array([w / 2.0, h / 2.0]) + a[:, 2]
    scale = np.linalg.inv(linear)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h], [0, 0]], float) - 0.5
    pts = corners @ linear.T + a[:, 2]
    z = float(m.result.get("stage_z_um", 0.0))
    values: list[tuple[str, object]] = [
        ("Color", MAP_COLOR), ("StageXYZ", (float(stage_xy[0]), float(stage_xy[1]), z)),
        ("NumPts", 5), ("Regis", 1), ("Type", int(ItemType.MAP)), ("Note", m.label),
        ("MapFile", m.map_file), ("MapSection", 0), ("MapMontage", 0),
        ("MapBinning", int(m.result.get("binning") or 1)),
        ("MapMagInd", int(m.result.get("mag_index") or 0)), ("MapCamera", 0),
        ("MapScaleMat", tuple(float(v) for v in scale.ravel())),
        ("MapWidthHeight", (w, h)), ("MapID", nav.unique_map_id()),
        ("PtsX", tuple(float(v) for v in pts[:, 0])), ("PtsY", tuple(float(v) for v in pts[:, 1])),
    ]
    item = NavigatorItem(name=m.label)
    for key, value in values:
        item = item.with_value(key, value)
    return nav.with_item(item), item


def build_navigator(maps: Sequence[NavMap], targets: Sequence[NavTarget]) -> NavigatorFile:
    """A navigator with ``maps`` (in order) then ``targets`` as points to acquire."""
    nav = NavigatorFile()
    ids: dict[str, int] = {}
    for m in maps:
        nav, item = _map_item(nav, m)
        ids[m.label] = item.map_id
    for t in targets:
        if t.map_label is not None and t.map_label not in ids:
            raise LimitViolation(f"target {t.label}: map {t.map_label!r} is not in the navigator "
                                 f"({sorted(ids)})")
        nav, _ = nav.add_point(t.x_um, t.y_um, t.z_um, label=t.label, note=t.note, acquire=True,
                               color=TARGET_COLOR,
                               drawn_id=None if t.map_label is None else ids[t.map_label])
    return nav


class NavTargetParams(FrozenParams):
    id: str = Field(min_length=1, max_length=32)
    x_um: float
    y_um: float
    z_um: float = 0.0
    square_id: str | None = None
    note: str = Field(default="", max_length=200)


class EMNavigatorParams(FrozenParams):
    """Which of this session's maps go in (atlas, squares), extra map sidecars from other
    sessions (paths), the targets, and the file name."""

    kind: Literal["em_navigator"] = "em_navigator"
    atlas: bool = True
    square_ids: tuple[str, ...] = ()
    map_jsons: tuple[str, ...] = ()
    targets: tuple[NavTargetParams, ...] = ()
    file_name: str = Field(default="clemd.nav", pattern=r"^[\w.+-]+\.nav$")


class EMNavigatorPlan(Plan):
    """One step, ``em-navigator/write``: the .nav file in the session folder."""

    name = "em_navigator"

    def __init__(self, params: EMNavigatorParams) -> None:
        self.p = params

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        yield Step("em-navigator/write", self._write, title="Write the SerialEM navigator")

    def total_steps(self, ctx: StepContext) -> int | None:
        return 1

    def _maps(self, ctx: StepContext) -> list[NavMap]:
        maps: list[NavMap] = []
        if self.p.atlas:
            maps.append(NavMap("atlas", ctx.result(ATLAS_KEY)["mrc"], ctx.result(ATLAS_KEY)))
        for sid in self.p.square_ids:
            res = ctx.result(map_key(sid))
            maps.append(NavMap(f"square-{sid}", res["mrc"], res))
        for path in self.p.map_jsons:
            p = Path(path) if Path(path).is_absolute() else ctx.data_dir / path
            res, base = read_map_sidecar(p)
            label = f"square-{res['square_id']}" if "square_id" in res else p.stem
            maps.append(NavMap(label, str(base / res["mrc"]), res))
        return maps

    def _write(self, ctx: StepContext) -> StepResult:
        maps = self._maps(ctx)
        targets = [NavTarget(t.id, t.x_um, t.y_um, t.z_um,
                             None if t.square_id is None else f"square-{t.square_id}", t.note)
                   for t in self.p.targets]
        nav = build_navigator(maps, targets)
        write(ctx.data_dir / self.p.file_name, nav)
        return {"nav": self.p.file_name, "maps": [m.label for m in maps],
                "targets": [t.label for t in targets],
                "artifacts": [artifact(self.p.file_name, "serialem_navigator",
                                       maps=len(maps), targets=len(targets))]}
