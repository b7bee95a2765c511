"""The study lock, in real processes: released when its holder dies, never while it lives, one holder at a time.

Each case runs on both kinds of lock: ``flock`` beside a journal file, and a PostgreSQL advisory
lock on the throwaway cluster of tests/servers.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

# Holds the lock of study "s" for argv[2] seconds, printing when it holds and when it lets go.
HOLDER = """
import sys, time
from experiments.coordination import study_lock
lock = study_lock(sys.argv[1], "s")
lock.acquire()
print("acquired", time.time(), flush=True)
time.sleep(float(sys.argv[2]))
print("released", time.time(), flush=True)
lock.release()
"""


@pytest.fixture(params=["journal", "postgresql"])
def storage(request, tmp_path) -> str:
    if request.param == "journal":
        return str(tmp_path / "studies.journal")
    return request.getfixturevalue("postgres").create_database(f"locks_{os.getpid()}_{time.monotonic_ns()}")


def hold(storage: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, storage, str(seconds)], cwd=REPO, stdout=subprocess.PIPE, text=True)


def wait_until_held(holder: subprocess.Popen) -> float:
    line = holder.stdout.readline()
    assert line.startswith("acquired"), line
    return float(line.split()[1])


def still_waiting(waiter: subprocess.Popen, seconds: float) -> bool:
    """Whether ``waiter`` has not taken the lock within ``seconds`` (it prints nothing until it has)."""
    os.set_blocking(waiter.stdout.fileno(), False)
    time.sleep(seconds)
    line = waiter.stdout.readline()
    os.set_blocking(waiter.stdout.fileno(), True)
    assert not line, f"the waiter took the lock: {line}"
    return waiter.poll() is None


def test_a_holder_killed_while_holding_frees_the_lock_at_once(storage):
    holder = hold(storage, 600)
    wait_until_held(holder)
    waiter = hold(storage, 0)
    assert still_waiting(waiter, 1.0)
    killed_at = time.time()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert wait_until_held(waiter) - killed_at < 5  # released by the kernel or the server, not by a timeout
    assert waiter.wait(timeout=30) == 0


def test_a_stalled_holder_keeps_the_lock_and_two_waiters_take_turns(storage):
    holder = hold(storage, 1)
    wait_until_held(holder)
    holder.send_signal(signal.SIGSTOP)  # a holder that stalls: alive, silent, for as long as it likes
    try:
        waiters = [hold(storage, 1), hold(storage, 1)]
        for waiter in waiters:
            assert still_waiting(waiter, 2.5)  # no age-based breaking: the lock stays with the stalled holder
    finally:
        holder.send_signal(signal.SIGCONT)
    holder_released = float(holder.stdout.read().split()[1])
    assert holder.wait(timeout=30) == 0
    spans = []
    for waiter in waiters:
        out = waiter.communicate(timeout=60)[0].split()
        assert waiter.returncode == 0
        spans.append((float(out[1]), float(out[3])))
    first, second = sorted(spans)
    assert holder_released <= first[0] and first[1] <= second[0]  # one holder at a time


@pytest.mark.parametrize(
    ("message", "reached", "waited"),
    [
        ('connection to server at "db" failed: FATAL:  the database system is shutting down', False, True),
        ('connection to server at "db" failed: FATAL:  the database system is starting up', False, True),
        ('connection to server at "db", port 5432 failed: Connection refused', True, True),
        ('connection to server at "db", port 5432 failed: Connection refused', False, False),  # a wrong host or port
        ('connection to server at "db" failed: FATAL:  password authentication failed for user "u"', True, False),
    ],
)
def test_a_restart_is_waited_out_and_a_mistake_is_not(message, reached, waited):
    from experiments.storage import restarting

    assert restarting(Exception(message), reached) is waited


def test_a_wrong_password_or_port_is_refused_at_once(postgres, monkeypatch):
    from experiments.coordination import open_storage
    from pipeline.config import ParameterError, TuneConfig

    url = postgres.create_database(f"refused_{os.getpid()}")
    monkeypatch.setenv("WRONG", "not-the-password")
    wrong_password = url.replace(url.split(":")[2].split("@")[0], "${WRONG}")
    wrong_port = url.replace(f":{postgres.port}/", ":1/")
    for storage in (wrong_password, wrong_port):
        started = time.monotonic()
        with pytest.raises(ParameterError, match="cannot be opened"):
            open_storage(TuneConfig(storage=storage))
        assert time.monotonic() - started < 10


def test_a_holder_learns_that_a_database_restart_took_its_lock(postgres):
    import psycopg

    from experiments.coordination import study_lock
    from experiments.storage import DATABASE_ERRORS

    lock = study_lock(postgres.create_database(f"confirm_{os.getpid()}"), "s")
    with lock:
        lock.confirm()  # still held
        with psycopg.connect(
            host=postgres.host,
            port=postgres.port,
            user="postgres",
            password=postgres.password,
            dbname="postgres",
            autocommit=True,
        ) as admin:  # what a restart does to every session: ends it, and its advisory locks with it
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'")
        with pytest.raises(DATABASE_ERRORS):
            lock.confirm()


def test_a_file_lock_taken_twice_by_one_thread_says_so_instead_of_waiting_for_itself(tmp_path):
    from experiments.coordination import study_lock

    storage = str(tmp_path / "studies.journal")
    with study_lock(storage, "s"):
        with pytest.raises(RuntimeError, match="already held by this thread"):
            study_lock(storage, "s").acquire()
        other = study_lock(storage, "other")  # another study's lock is another file
        assert other.acquire(blocking=False)
        other.release()
    with study_lock(storage, "s"):  # released: taken again at once
        pass


def ctrl_c_at_line(number: int, files: tuple[str, ...]):
    """A trace function that, at the ``number``-th line run in ``files``, delivers SIGINT to its
    handler as the kernel would there (the handler is called; tracing then stops). Counts lines in ``seen``."""
    seen = []

    def trace(frame, event, arg):
        if not frame.f_code.co_filename.endswith(files):
            return None
        if event == "line":
            seen.append(frame.f_lineno)
            if len(seen) == number:
                sys.settrace(None)
                signal.getsignal(signal.SIGINT)(signal.SIGINT, frame)
        return trace

    trace.seen = seen
    return trace


def test_a_ctrl_c_at_any_line_of_the_journal_lock_is_a_keyboard_interrupt_and_frees_the_lock(tmp_path):
    """A Ctrl-C that lands while a worker writes to the journal is an interrupt (its trial is
    re-queued), never another error (its trial would fail), and leaves no lock for the others to wait on."""
    import optuna

    from experiments.coordination import open_storage
    from pipeline.config import TuneConfig
    from pipeline.signals import signal_handler

    journal = str(tmp_path / "studies.journal")
    study = optuna.create_study(study_name="s", storage=open_storage(TuneConfig(storage=journal)))
    lock_code = ("optuna/storages/journal/_file.py", "experiments/coordination.py", "pipeline/signals.py")
    counting = ctrl_c_at_line(0, lock_code)
    sys.settrace(counting)
    study.set_user_attr("written", 0)
    sys.settrace(None)
    assert len(counting.seen) > 10  # the lock's own lines were traced
    with signal_handler(signal.default_int_handler, signal.SIGINT):  # Python's Ctrl-C: a pytest-xdist worker may ignore SIGINT
        for number in range(1, len(counting.seen) + 1):
            sys.settrace(ctrl_c_at_line(number, lock_code))
            try:
                with pytest.raises(KeyboardInterrupt):
                    study.set_user_attr("written", number)
            finally:
                sys.settrace(None)
            assert not os.path.exists(f"{journal}.lock"), f"Ctrl-C at lock line {number} left the lock held"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after every holding
