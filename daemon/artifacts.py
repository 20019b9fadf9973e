"""Files that steps write: atomic, fsynced, named by the step so a rerun overwrites them.

The rule that makes a kill between "file written" and "step committed" harmless: a step
writes each file under a name derived from its step key, through a temporary name and
``os.replace``. If the service dies before the commit, the resumed step writes the same name
again (the old file is replaced, never duplicated); if it dies after the commit, the step
does not rerun. The journal records the file in the same transaction as the step result
(daemon/stepstore.py), after fsyncing it, so a recorded artifact is always complete on disk.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from numpy.typing import NDArray


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (the file must exist)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_relative(path: str) -> PurePosixPath:
    """A session-relative path, refused if absolute or escaping the session folder."""
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        raise ValueError(f"artifact path {path!r} must be relative to the session folder "
                         f"without '..'")
    return p


def write_atomic(root: Path, rel: str, data: bytes) -> Path:
    """Write ``data`` to ``root/rel`` via a fixed temporary name; fsync file and folder."""
    target = root / safe_relative(rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return target


def write_npy(root: Path, rel: str, array: NDArray[Any], kind: str,
              meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an array as .npy atomically; return the artifact record for the step result."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_atomic(root, rel, buf.getvalue())
    return {"path": rel, "kind": kind, "meta": dict(meta or {})}
