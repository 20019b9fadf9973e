"""Write files so that a crash never leaves a half-written file under the final name.

Every data file a session writes (OME-TIFF, MRC, mdoc, angle files) goes through
``atomic_path``: the writer fills a temporary file in the same folder, the file is fsynced,
renamed over the final name (``os.replace`` is atomic on POSIX and Windows within one file
system) and the folder is fsynced so that the rename itself survives a power cut. A reader
therefore sees the old file, the new file, or none, never a torn one; a failed write removes
its temporary file and re-raises.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drivers.errors import ClemdError

__all__ = ["DataWriteError", "atomic_path", "fsync_path", "write_text_atomic"]


class DataWriteError(ClemdError, OSError):
    """A data file could not be written (disk full, permissions, missing folder).

    Not retryable as such: the same call fails the same way until the operator frees space or
    fixes the folder. The message names the final path; the OSError is chained.
    """


def fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success make it ``final`` atomically.

    The temporary name keeps the final suffix (some writers choose formats by suffix) and
    starts with a dot so that folder watchers ignore it. Raises DataWriteError if the folder
    does not exist or the write fails; exceptions from the writer propagate unchanged after
    the temporary file is removed.
    """
    target = Path(final)
    if not target.parent.is_dir():
        raise DataWriteError(f"cannot write {target}: folder {target.parent} does not exist")
    tmp = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}.tmp{target.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent, directory=True)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataWriteError(f"cannot write {target}: {err}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return Path(path)
