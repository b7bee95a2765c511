"""Signals for the stages and the training loop: SIGTERM handled like Ctrl-C, handlers for a block,
and the loop's stop requests. Every handler here is installed for a block and the previous one put
back after it: only an entry point's ``main()`` installs one for good.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from types import SimpleNamespace


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


@contextmanager
def signals_held_back():
    """Ctrl-C and SIGTERM held back inside the block and delivered after it: for a section an
    exception must not cut in two (a lock's acquire and release). Outside the main thread nothing changes."""
    arrived = []
    try:
        with signal_handler(lambda number, frame: arrived.append(number), signal.SIGINT, signal.SIGTERM):
            yield
    finally:
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)  # to the handler put back, as if it came now


@contextmanager
def stop_requests():
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the batch in
    progress; the same signal again stops at once. Outside the main thread signals stay as they are.
    Yields the request: its ``signal_number`` is 0 until one arrives."""
    stop = SimpleNamespace(signal_number=0)

    def request(signal_number, frame):
        if stop.signal_number == signal_number:  # asked twice: do not wait for the batch
            raise KeyboardInterrupt
        # Another signal (the SIGTERM `mlflow run` sends its stage after a Ctrl-C) changes nothing.
        stop.signal_number = stop.signal_number or signal_number
        print(
            f"\n{signal.Signals(signal_number).name}: stopping after this batch and writing a checkpoint "
            "(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    raise_if_terminated()  # a SIGTERM whose exception was lost before training began
    with signal_handler(request, signal.SIGINT, signal.SIGTERM):
        yield stop
