"""``protocols.plan.StepStore`` on the journal, one per session.

``put`` returns only when the step result, the files the step wrote and their events are
committed together: files listed under ``result["artifacts"]`` (``{"path", "kind", "meta"}``,
paths relative to the session folder) are checked, fsynced, and inserted in the same
transaction as the step row. An artifact path recorded twice is refused, so an acquisition
can never be counted twice.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.artifacts import fsync_dir, fsync_file, safe_relative
from daemon.events import EventBus, EventKind, topic
from daemon.journal import dumps
from protocols.plan import InvalidStep, StepResult


class ArtifactSpec(BaseModel):
    """One file a step wrote, as it lists it in its result."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(min_length=1, max_length=1024)
    kind: str = Field(default="file", min_length=1, max_length=64)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        return str(safe_relative(value))


class JournalStepStore:
    """The step journal of one session."""

    def __init__(self, bus: EventBus, session_id: str, session_dir: Path) -> None:
        self._bus = bus
        self.session_id = session_id
        self.session_dir = session_dir

    def get(self, key: str) -> StepResult | None:
        return self._bus.journal.step_result(self.session_id, key)

    def put(self, key: str, result: StepResult) -> None:
        try:
            payload = dumps(result)
        except (TypeError, ValueError) as err:
            raise InvalidStep(f"step {key} returned a result that is not strict JSON: "
                              f"{err}") from err
        specs = self._artifacts(key, result.get("artifacts", []))
        sizes = []
        folders: set[Path] = set()
        for spec in specs:
            path = self.session_dir / spec.path
            if not path.is_file():
                raise InvalidStep(f"step {key} lists artifact {spec.path} but "
                                  f"{path} is not a file")
            fsync_file(path)
            folders.add(path.parent)
            sizes.append(path.stat().st_size)
        for folder in folders:
            fsync_dir(folder)
        try:
            with self._bus.transaction() as tx:
                rows = tx.add_step(self.session_id, key, payload,
                                   [(s.path, s.kind, n, s.meta) for s, n in zip(specs, sizes)])
                for row in rows:
                    tx.add_event(topic(EventKind.IMAGE, self.session_id), self.session_id,
                                 {"artifact_id": row.id, "path": row.path, "kind": row.kind,
                                  "step": key, "size_bytes": row.size_bytes, "meta": row.meta})
        except sqlite3.IntegrityError as err:
            raise InvalidStep(f"step {key} committed twice, or one of its artifact paths "
                              f"is already recorded: {err}") from err

    @staticmethod
    def _artifacts(key: str, raw: Any) -> list[ArtifactSpec]:
        if not isinstance(raw, list):
            raise InvalidStep(f"step {key}: result['artifacts'] must be a list")
        try:
            return [ArtifactSpec.model_validate(a) for a in raw]
        except ValidationError as err:
            raise InvalidStep(f"step {key}: bad artifact record: {err}") from err
