"""Signals for the stages and the training loop: SIGTERM handled like Ctrl-C, and handlers for a block.

The lowest layer of ``pipeline/``: it imports nothing of the project, so the loop
(``training.py``) and the MLflow helpers (``tracking.py``) both use it without reaching sideways.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a scheduler's preemption, `kill`): handled like Ctrl-C."""

    signal_number = signal.SIGTERM
    # Set by raise_terminated. Python drops an exception raised while a finalizer or a weakref
    # callback runs (it prints "Exception ignored in ..." and goes on), so a SIGTERM can be lost
    # that way: raise_if_terminated() raises it again at the next safe point.
    received = False


def raise_terminated(signal_number, frame):
    Terminated.received = True
    raise Terminated  # by default SIGTERM ends the process before any cleanup: the run would stay RUNNING


def raise_if_terminated() -> None:
    """Raise Terminated if raise_terminated ran and its exception was lost on the way."""
    if Terminated.received:
        raise Terminated


@contextmanager
def signal_handler(handler: Callable, *signal_numbers: int):
    """Handle ``signal_numbers`` with ``handler`` inside the block, then restore the previous
    handlers. Only the main thread may install handlers; in any other nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in signal_numbers}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
