"""The journal: durability settings, the step store with artifacts, refusals that leave it
unchanged, and a process killed between writing a file and committing its step."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from daemon.artifacts import write_npy
from daemon.errors import JournalError
from daemon.events import EventBus
from daemon.journal import Journal
from daemon.stepstore import JournalStepStore
from drivers.base import VirtualClock
from protocols.plan import InvalidStep, Plan, Step, StepContext, StepResult, run_plan
from tests.daemon.helpers import journal_snapshot

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.sqlite")
    with j.write() as tx:
        tx.insert_session(id="s1", name="s1", template="t", params={}, state="running",
                          reason="created", data_dir=str(tmp_path / "s1"))
    yield j
    j.close()


def test_wal_and_full_sync(journal: Journal, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    with journal.write() as tx:
        assert tx.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL


def test_step_and_its_artifacts_commit_together(journal: Journal, tmp_path: Path) -> None:
    folder = tmp_path / "s1"
    store = JournalStepStore(EventBus(journal), "s1", folder)
    spec = write_npy(folder, "lm/a.npy", np.arange(6).reshape(2, 3), "lm_image", {"z": 1})
    store.put("lm/a", {"artifacts": [spec], "value": 3})
    assert store.get("lm/a") == {"artifacts": [spec], "value": 3}
    assert store.get("lm/b") is None
    [art] = journal.artifacts("s1")
    assert (art.step_key, art.path, art.kind, art.meta) == ("lm/a", "lm/a.npy", "lm_image",
                                                            {"z": 1})
    assert art.size_bytes == (folder / "lm/a.npy").stat().st_size
    [event] = journal.events(topic_prefix="image")
    assert event.payload["artifact_id"] == art.id and event.payload["step"] == "lm/a"
    assert journal.session("s1").steps_done == 1  # type: ignore[union-attr]
    reopened = Journal(tmp_path / "journal.sqlite")
    try:
        assert reopened.step_result("s1", "lm/a") == {"artifacts": [spec], "value": 3}
    finally:
        reopened.close()


@pytest.mark.parametrize("case", ["twice", "path-reused", "nan", "not-json", "missing-file",
                                  "escaping-path", "artifacts-not-list"])
def test_refused_results_leave_the_journal_unchanged(journal: Journal, tmp_path: Path,
                                                     case: str) -> None:
    folder = tmp_path / "s1"
    store = JournalStepStore(EventBus(journal), "s1", folder)
    spec = write_npy(folder, "lm/a.npy", np.zeros((2, 2)), "lm_image")
    store.put("lm/a", {"artifacts": [spec]})
    before = journal_snapshot(tmp_path)
    bad: dict[str, tuple[str, StepResult]] = {
        "twice": ("lm/a", {}),
        "path-reused": ("lm/b", {"artifacts": [spec]}),
        "nan": ("lm/b", {"x": float("nan")}),
        "not-json": ("lm/b", {"x": object()}),
        "missing-file": ("lm/b", {"artifacts": [{"path": "lm/none.npy"}]}),
        "escaping-path": ("lm/b", {"artifacts": [{"path": "../../etc/passwd"}]}),
        "artifacts-not-list": ("lm/b", {"artifacts": "lm/a.npy"}),
    }
    key, result = bad[case]
    with pytest.raises(InvalidStep):
        store.put(key, result)
    assert journal_snapshot(tmp_path) == before


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Journal(tmp_path / "journal.sqlite").close()
    conn = sqlite3.connect(tmp_path / "journal.sqlite")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match="schema 99"):
        Journal(tmp_path / "journal.sqlite")


class ThreeImages(Plan):
    """Three steps, each writing one image whose pixels say which run wrote it.

    With ``die_at`` the process dies in that step: ``after-write`` once the file is complete
    (the step is not committed), ``mid-write`` with a torn temporary file.
    """

    name = "three"

    def __init__(self, run: int, die_at: int | None = None, phase: str = "") -> None:
        self.run, self.die_at, self.phase = run, die_at, phase

    def steps(self, ctx: StepContext) -> Iterator[Step]:
        for i in range(3):
            yield Step(f"img/{i}", self._action(i))

    def _action(self, i: int) -> Callable[[StepContext], StepResult]:
        def action(ctx: StepContext) -> StepResult:
            data = np.full((4, 4), self.run)
            if i == self.die_at and self.phase == "mid-write":
                (ctx.data_dir / "img").mkdir(parents=True, exist_ok=True)
                (ctx.data_dir / "img" / f".{i}.npy.partial").write_bytes(b"\x93NUMPY torn")
                os._exit(9)
            spec = write_npy(ctx.data_dir, f"img/{i}.npy", data, "lm_image")
            if i == self.die_at:
                os._exit(9)
            return {"artifacts": [spec], "run": self.run}
        return action


CRASHING_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from daemon.events import EventBus
    from daemon.journal import Journal
    from daemon.stepstore import JournalStepStore
    from drivers.base import VirtualClock
    from protocols.plan import StepContext, run_plan
    from tests.daemon.test_journal import ThreeImages

    root, phase = Path(sys.argv[1]), sys.argv[2]
    journal = Journal(root / "journal.sqlite")
    store = JournalStepStore(EventBus(journal), "s1", root / "s1")
    ctx = StepContext(clock=VirtualClock(), data_dir=root / "s1", store=store)
    run_plan(ThreeImages(run=1, die_at=1, phase=phase), ctx)
""")


@pytest.mark.parametrize("phase", ["after-write", "mid-write"])
def test_killed_between_write_and_commit_neither_loses_nor_duplicates(
        journal: Journal, tmp_path: Path, phase: str) -> None:
    child = subprocess.run([sys.executable, "-c", CRASHING_CHILD, str(tmp_path), phase],
                           check=False, cwd=REPO, capture_output=True, timeout=60)
    assert child.returncode == 9, child.stderr.decode()
    assert journal.step_keys("s1") == ["img/0"]
    folder = tmp_path / "s1"
    # resume: the committed step is not rerun, the interrupted one writes its file again
    store = JournalStepStore(EventBus(journal), "s1", folder)
    ran = run_plan(ThreeImages(run=2), StepContext(clock=VirtualClock(), data_dir=folder,
                                                   store=store))
    assert ran == ["img/1", "img/2"]
    arts = journal.artifacts("s1")
    assert [a.path for a in arts] == ["img/0.npy", "img/1.npy", "img/2.npy"]
    assert [int(np.load(folder / a.path)[0, 0]) for a in arts] == [1, 2, 2]
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file()) == ["img/0.npy", "img/1.npy", "img/2.npy"]
