"""Stopping a run cleanly on SIGTERM / Ctrl-C: a polled flag instead of an exception.

Light on purpose (no JAX import until a multi-process run asks), so an entry point can install
the handler before its heavy imports: a Ctrl-C during start-up or the first compile then only
sets the flag, instead of raising inside XLA's threads.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import tqdm
from absl import logging


class StopFlag:
    """Set when a stop signal arrives; the training loop polls it, saves and exits.

    The first signal only sets the flag. A second one restores the previous handlers and
    re-delivers the signal, so a second Ctrl-C interrupts at once as usual.
    """

    def __init__(self, signals: Iterable[int]):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived in this process."""
        return self.signum is not None

    def __bool__(self) -> bool:
        return self.requested

    def requested_anywhere(self) -> bool:
        """Whether any process got a stop signal (a collective: all processes must call it).

        Preemption notices may reach only some hosts; all must stop at the same iteration,
        or the others would wait forever in the next collective save.
        """
        import jax  # noqa: PLC0415 (kept out of start-up)
        import numpy as np  # noqa: PLC0415

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested))
        return bool(np.any(flags))

    def _install(self) -> None:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self.close()
            signal.raise_signal(signum)  # now handled as if we had never been installed
            return
        self.signum = signum
        message = (f"Got {signal.Signals(signum).name}: stopping at the next safe point (after "
                   "the current iteration, with a checkpoint); send it again to stop at once.")
        logging.info("%s", message)
        tqdm.tqdm.write(message, file=sys.stderr)  # above a progress bar, whatever the verbosity

    def close(self) -> None:
        """Puts the previous handlers back (idempotent)."""
        for s, handler in self._previous.items():
            # None means the handler was not installed from Python; the default is closest.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def install_stop_handler(
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> StopFlag:
    """Installs handlers that turn `signals` into a polled `StopFlag` (main thread only).

    Returns:
        The flag; `close()` it (or use it as a context manager) to restore the old handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_stop_handler must be called from the main thread: Python "
                           "runs signal handlers only there.")
    flag = StopFlag(signals)
    flag._install()
    return flag
