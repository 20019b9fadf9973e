"""An OME-TIFF filled while its pixels are computed, made final in one short step at the end.

Why: an LM atlas is hundreds of MB of float32 and is computed tile by tile while the
microscope acquires (protocols/lm_atlas_build.py). Written in one piece after the last tile,
it costs a few tenths of a second of disc writing that nothing else can overlap. Here the file
is created at its full size when the atlas canvas is known, under a hidden temporary name in
the final folder, and memory-mapped: regions are written into it as they are finished, and
``flush`` lets the system write them back meanwhile. ``commit`` then only finishes the last
region, rewrites the OME-XML with the final metadata (the atlas's affine is known only at the
end; tifffile rewrites the description in place or appends it), fsyncs the file, renames it
over the final name and fsyncs the folder, so a reader sees no atlas or the whole atlas, as
with protocols/atomic_write.py. ``discard`` removes an unfinished file; a commit removes those
of writers that were abandoned.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from numpy.typing import NDArray

from drivers.imaging import Image
from protocols.atomic_write import DataWriteError, fsync_path
from protocols.ome_tiff import OmeTiffError, ome_layout

__all__ = ["OmeTiffStream"]


class OmeTiffStream:
    """A (C, H, W) OME-TIFF of one time point and one z, written in place (module docstring).

    ``templates``: one Image per channel with the metadata known now (data: any array of the
    final shape and dtype, e.g. ``np.broadcast_to``); ``planes`` is the writable (C, H, W)
    memory map of the file's pixels, zero where nothing was written.
    """

    def __init__(self, path: str | os.PathLike[str], templates: Sequence[Image],
                 name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise DataWriteError(f"cannot write {self.path}: folder {self.path.parent} "
                                 "does not exist")
        self.name = name
        ordered, shape, metadata = ome_layout(list(templates), name=name)
        if shape[0] != 1 or shape[2] != 1:
            raise OmeTiffError(f"a stream holds one time point and one z, got (T, C, Z) {shape}")
        first = ordered[0]
        self._shape5 = (*shape, *first.shape)
        self._dtype = np.dtype(first.data.dtype)
        self.tmp = self.path.with_name(
            f".{self.path.stem}.{uuid.uuid4().hex[:8]}.tmp{self.path.suffix}")
        try:
            memmap = tifffile.memmap(self.tmp, shape=self._shape5, dtype=self._dtype, ome=True,
                                     metadata=metadata, photometric="minisblack")
        except OSError as err:
            raise DataWriteError(f"cannot create {self.tmp}: {err}") from err
        self._memmap: Any = memmap
        self.planes: NDArray[Any] = memmap[0, :, 0]
        self.committed = False

    def flush(self) -> None:
        """Hand the regions written so far to the system for writing back (no fsync)."""
        if self._memmap is not None:
            self._memmap.flush()

    def commit(self, planes: Sequence[Image]) -> Path:
        """Make the file final with the metadata of ``planes`` (one per channel, in the
        templates' order; their data are not read) and move it to its name. Raises
        DataWriteError if the file cannot be written."""
        ordered, _shape, metadata = ome_layout(list(planes), name=self.name)
        if (len(ordered),) + ordered[0].shape != self.planes.shape:
            raise OmeTiffError(f"planes of shape {(len(ordered),) + ordered[0].shape} do not "
                               f"match the stream's {self.planes.shape}")
        omexml = tifffile.OmeXml(**metadata)
        c, h, w = self.planes.shape
        omexml.addimage(dtype=self._dtype, shape=self._shape5, storedshape=(c, 1, 1, h, w, 1),
                        **metadata)
        try:
            self._memmap.flush()
            self.planes = np.empty((0, 0, 0), self._dtype)
            self._memmap = None
            with tifffile.TiffFile(self.tmp, mode="r+") as tif:
                page = tif.pages.first
                page.tags["ImageDescription"].overwrite(omexml.tostring(declaration=True).encode())
            fsync_path(self.tmp)
            os.replace(self.tmp, self.path)
            fsync_path(self.path.parent, directory=True)
        except OSError as err:
            raise DataWriteError(f"cannot write {self.path}: {err}") from err
        self.committed = True
        # streams for this file that were never committed (their writer was abandoned: a
        # plan rebuilt after a pause, a process killed) are of no use now
        for stale in self.path.parent.glob(f".{self.path.stem}.*.tmp{self.path.suffix}"):
            stale.unlink(missing_ok=True)
        return self.path

    def discard(self) -> None:
        """Remove the unfinished file (nothing to do once committed)."""
        self._memmap = None
        self.planes = np.empty((0, 0, 0), self._dtype)
        if not self.committed:
            self.tmp.unlink(missing_ok=True)
