"""Frames from pycromanager's ``Acquisition``, handed to the caller's thread as they arrive.

pycromanager runs hardware and camera on its own engine threads and calls an
``image_process_fn`` for every frame on yet another. ``FrameStream`` takes each frame there
(intercepting it, so nothing is stored twice), stamps it with the Clock, and puts it on a
queue that ``frames()`` drains on the caller's thread. A post-hardware hook reads the stage
back after the engine has moved and before the camera fires, so every frame carries the
position the instrument reported for it rather than the one requested.

The end of the stream is pycromanager's "data sink finished" notification: the engine posts
it after the last frame has passed the image processor, so a frame can never arrive after
it. A run that ends early (abort, hardware error) therefore shows up as that notification
arriving before all frames, and ``close()`` surfaces the engine's error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from numpy.typing import NDArray

from drivers.clock import Clock
from drivers.errors import Aborted, DeviceTimeout, HardwareFault
from drivers.micromanager_core import MMConnection, unsigned_frame
from drivers.micromanager_events import EVENT_AXIS

__all__ = ["Frame", "FrameStream"]

log = structlog.get_logger(__name__)

_FINISHED = object()


@dataclass(frozen=True)
class Frame:
    """One camera frame, the event it answers, and the stage as read back before it."""

    data: NDArray[Any]
    event_number: int
    stage_um: tuple[float, float, float]
    time_s: float
    tags: dict[str, Any]


class FrameStream:
    """One pycromanager Acquisition, fed event lists and drained frame by frame.

    Call from one thread: ``submit`` a list of pycromanager events, then take exactly that
    many frames from ``frames``; repeat; ``close`` always. ``abort`` may come from any thread.
    ``read_stage`` and ``prepare_event`` (given an event number, just before the engine
    sets up the hardware for it; None installs no hook) run on the engine thread while the
    caller holds the connection's lock on the engine's behalf, so they must call the core
    directly, without taking that lock.
    """

    def __init__(self, connection: MMConnection, clock: Clock,
                 read_stage: Callable[[], tuple[float, float, float]],
                 prepare_event: Callable[[int], None] | None = None) -> None:
        from pycromanager import Acquisition

        self._conn = connection
        self._clock = clock
        self._read_stage = read_stage
        self._prepare_event = prepare_event
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stage: dict[int, tuple[float, float, float]] = {}
        self._hook_error: BaseException | None = None
        self._aborted = threading.Event()
        self._state_lock = threading.Lock()  # abort() from another thread vs close()
        self._finished = False
        self._closed = False
        kwargs: dict[str, Any] = {}
        if connection.bridge_port is not None:
            kwargs = {"show_display": False, "port": connection.bridge_port}
        if prepare_event is not None:
            kwargs["pre_hardware_hook_fn"] = self._on_hardware_next
        with connection.errors("starting a Micro-Manager acquisition"):
            self._acq = Acquisition(image_process_fn=self._on_image,
                                    post_hardware_hook_fn=self._on_hardware_ready,
                                    notification_callback_fn=self._on_notification, **kwargs)

    # -- engine-side callbacks (pycromanager threads) --------------------------------------

    def _on_hardware_next(self, event: dict[str, Any] | list[dict[str, Any]]) -> Any:
        """Before the engine sets up an event (or a merged sequence): clemd's own steps."""
        assert self._prepare_event is not None  # installed only when given
        with self._kept_errors():
            for number in _numbers(event):
                self._prepare_event(number)
        return event

    def _on_hardware_ready(self, event: dict[str, Any] | list[dict[str, Any]]) -> Any:
        """Read the stage once per engine step (one event, or a merged hardware sequence)."""
        with self._kept_errors():
            position = self._read_stage()
            for number in _numbers(event):
                self._stage[number] = position
        return event

    @contextmanager
    def _kept_errors(self) -> Iterator[None]:
        """Keep a hook's error for ``close`` and re-raise it so the engine aborts the run.

        pycromanager catches a hook's exception, prints it and aborts without recording it;
        keeping it here is what turns it into a clemd error instead of a short run.
        """
        try:
            yield
        except BaseException as err:
            if self._hook_error is None:
                self._hook_error = err
            raise

    def _on_image(self, data: NDArray[Any], tags: dict[str, Any]) -> None:
        number = int(tags["Axes"][EVENT_AXIS])
        shape = (int(tags["Height"]), int(tags["Width"]))
        self._queue.put(Frame(data=unsigned_frame(data, shape), event_number=number,
                              stage_um=self._stage[number], time_s=self._clock.now(),
                              tags=tags))
        # Returning nothing intercepts the frame: pycromanager stores no second copy.

    def _on_notification(self, notification: Any) -> None:
        from pycromanager import AcqNotification

        if AcqNotification.is_data_sink_finished_notification(notification):
            self._queue.put(_FINISHED)

    # -- caller side ------------------------------------------------------------------------

    def submit(self, events: Sequence[dict[str, Any]]) -> None:
        with self._conn.errors("submitting acquisition events"):
            self._acq.acquire(list(events))

    def frames(self, count: int, timeout_s: float) -> Iterator[Frame]:
        """Yield ``count`` frames; raise if the run ends first or a frame takes too long.

        ``timeout_s`` bounds the wait for each frame (exposure, moves and readout included).
        Raises ``Aborted`` after ``abort()``, ``DeviceTimeout`` when no frame comes in time,
        ``HardwareFault`` (or the engine's error, translated) when the run ends early.
        """
        for received in range(count):
            try:
                item = self._queue.get(timeout=timeout_s)
            except queue.Empty:
                # pycromanager 1.0.2's in-process engine drops some hardware errors (they
                # only reach its log), and then this timeout is the only sign of them.
                raise DeviceTimeout(f"no frame from Micro-Manager within {timeout_s:g} s "
                                    f"(frame {received + 1} of {count}; lm.frame_timeout_s); "
                                    f"a hardware error may be in pycromanager's log") from None
            if item is _FINISHED:
                self._finished = True
                self._raise_early_end(received, count)
            yield item

    def _raise_early_end(self, received: int, count: int) -> None:
        if self._aborted.is_set():
            raise Aborted(f"acquisition aborted after {received} of {count} frames")
        self.close()
        raise HardwareFault(f"Micro-Manager acquisition ended after {received} of {count} "
                            f"frames without an error")

    def abort(self) -> None:
        """Stop the engine at its next step and the camera at once; safe from any thread.

        After ``close()`` nothing is running and this does nothing.
        """
        self._aborted.set()
        with self._state_lock, self._conn.errors("aborting the Micro-Manager acquisition"):
            if self._closed:
                return
            self._acq.abort()
            core = self._conn.core
            if core.is_sequence_running():
                core.stop_sequence_acquisition()

    def close(self) -> None:
        """Finish the acquisition and wait for pycromanager's threads; surface their errors.

        Idempotent. The hook's error comes first (it caused the abort); otherwise the
        engine's own, translated.
        """
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        engine_error: Exception | None = None
        with self._conn.errors("finishing the Micro-Manager acquisition"):
            try:
                self._acq.mark_finished()
                self._acq.await_completion()
            except Exception as err:  # noqa: BLE001  (translated below, never dropped)
                # pycromanager re-raises whatever stopped its engine, wrapped or not in a
                # plain Exception; this is the edge where it becomes a clemd error.
                engine_error = err
            finally:
                core = self._conn.core
                if core.is_sequence_running():
                    core.stop_sequence_acquisition()
        if self._hook_error is not None:
            raise HardwareFault(f"a hardware step inside the Micro-Manager acquisition "
                                f"failed: {self._hook_error}") from self._hook_error
        if engine_error is not None:
            raise HardwareFault(f"Micro-Manager acquisition failed: {engine_error}") \
                from engine_error


def _numbers(event: dict[str, Any] | list[dict[str, Any]]) -> list[int]:
    """Event numbers of one pycromanager event or of a merged hardware sequence."""
    return [int(e["axes"][EVENT_AXIS]) for e in (event if isinstance(event, list) else [event])]
