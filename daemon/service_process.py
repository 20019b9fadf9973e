"""``clemd serve`` as a child process: started, waited for, killed or stopped.

``make demo``, the kill -9 test and the service benchmark all run the real service in its own
process (so that a kill is a real kill); this is the one place that knows how.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daemon.client import ClemdApiError, ClemdClient
from drivers.errors import ClemdError

__all__ = ["ServiceProcess", "ServiceStartFailed"]


class ServiceStartFailed(ClemdError):
    """The service exited, or did not answer ``status``, while starting; see its log."""


class ServiceProcess:
    """One ``python -m daemon.cli serve --config CONFIG``, its output appended to ``log``."""

    def __init__(self, config: Path, log: Path, cwd: Path | None = None) -> None:
        self.config = config
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def start(self, client: ClemdClient, timeout_s: float = 60.0) -> float:
        """Start and wait until ``status`` answers; return the seconds that took."""
        t0 = time.monotonic()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "serve", "--config", str(self.config)],
                cwd=self.cwd, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            try:
                client.call("status", timeout_s=0.5)
                return time.monotonic() - t0
            except ClemdApiError as err:
                if self.proc.poll() is not None:
                    raise ServiceStartFailed(f"the service exited with status "
                                             f"{self.proc.returncode} while starting; see "
                                             f"{self.log}") from None
                if time.monotonic() - t0 > timeout_s:
                    raise ServiceStartFailed(f"the service did not answer within {timeout_s:g} "
                                             f"s ({err}); see {self.log}") from err

    def kill(self) -> None:
        """SIGKILL: what a power cut or the OOM killer does."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to ``timeout_s`` for the process to exit; its status, or None if running."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the service finishes the step in hand), then SIGKILL after ``timeout_s``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.returncode
