"""Graceful stop of a training run on SIGINT (Ctrl-C) or SIGTERM (schedulers, `kill`).

The first signal only sets a flag: the loop finishes the optimizer step it is in, writes a checkpoint and
returns, so no work since the last periodic checkpoint is lost. A second signal stops at once (the
previous checkpoints are intact: they are written atomically).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager: while active, SIGINT/SIGTERM request a stop instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        # Handlers can only be installed from the main thread (training in a worker thread keeps the defaults).
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: the user insists
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name} received: finishing this step and writing a checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
