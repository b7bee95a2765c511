"""Where a study lives: its storage checked and named (coordination.py opens it), and a database
restart (an upgrade, a failover) waited out, which Optuna does not: a connection PostgreSQL refuses
while it stops or starts is tried again every second, for up to ``DATABASE_RESTART_LIMIT`` seconds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
import sqlalchemy

from pipeline.config import ParameterError, say

DATABASE_RESTART_LIMIT = 600  # seconds a worker waits for its database to come back before it fails
# What a database call raises when its connection is cut (Optuna wraps SQLAlchemy's error in its own).
DATABASE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError)


def first_line(error: BaseException) -> str:
    """A database error in one line (a driver's message runs to several): its first, else its type."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def storage_kind(storage: str) -> str:
    """``journal`` (a file path), ``sqlite`` or ``postgresql``."""
    return storage.split("://")[0].split("+")[0] if "://" in storage else "journal"


def check_storage(storage: str, n_workers: int = 1) -> None:
    """Refuse, in one line, a storage tune cannot use; the URL is never echoed (it may hold a password)."""
    kind = storage_kind(storage)
    if kind == "journal":
        if not (folder := Path(storage).resolve().parent).is_dir():
            raise ParameterError(f"storage={storage!r} is not allowed: its folder {folder} does not exist")
        return
    scheme = storage.split("://")[0]
    if kind not in ("sqlite", "postgresql"):
        raise ParameterError(
            f"storage={scheme}://... is not allowed: must be a journal file path, sqlite:///<file> or postgresql://..."
        )
    try:
        url = sqlalchemy.make_url(storage)
        dialect = url.get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError):
        raise ParameterError(f"storage={scheme}://... is not allowed: not a database URL SQLAlchemy understands") from None
    try:
        dialect.import_dbapi()
    except ModuleNotFoundError as missing:
        raise ParameterError(
            f"storage={scheme}://... needs the Python package {missing.name!r}, which is not installed: "
            f"pip install it, or name an installed driver (postgresql+psycopg://, postgresql+psycopg2://)"
        ) from None
    if url.password and not (url.password.startswith("${") and url.password.endswith("}")):
        raise ParameterError(
            f"storage={scheme}://... holds a password, which `mlflow run` would log as a param: "
            "put it in the environment (PGPASSWORD, ~/.pgpass, or ${VAR} in the URL)"
        )
    if kind == "sqlite" and n_workers > 1:
        raise ParameterError(
            f"n_workers={n_workers} is not allowed with storage=sqlite://...: SQLite is not safe for "
            "several workers; use a journal file (one machine) or PostgreSQL (many)"
        )


def public_storage(storage: str) -> str:
    """``storage`` with any password replaced by ***, fit to log."""
    return storage if "://" not in storage else sqlalchemy.make_url(storage).render_as_string(hide_password=True)


# What libpq reports while PostgreSQL stops or starts: a failed connection carries no SQLSTATE.
RESTART_MESSAGES = ("the database system is shutting down", "the database system is starting up", "not yet accepting connections")


def restarting(error: Exception, reached: bool) -> bool:
    """Whether a failed connection means the database is restarting: it says so, or (``reached``:
    it answered before) it refuses connections."""
    text = str(error)
    return any(message in text for message in RESTART_MESSAGES) or (reached and "Connection refused" in text)


# When this process last saw its database come back after refusing it (time.monotonic()). Process-wide:
# every engine of one process talks to one database, and a worker judges heartbeats by it.
_back_since = -math.inf


def seconds_since_database_back() -> float:
    """How long ago this process last reached its database after waiting for it (inf: never waited)."""
    return time.monotonic() - _back_since


def wait_out_restarts(engine: sqlalchemy.Engine, reached: bool = True, limit: float = DATABASE_RESTART_LIMIT) -> None:
    """Make ``engine``'s new connections wait while the database restarts, instead of failing.
    ``reached``: the database answered before (see ``restarting``). A wrong password still fails at once."""

    @sqlalchemy.event.listens_for(engine, "do_connect")
    def connect(dialect, connection_record, cargs, cparams):
        global _back_since
        deadline, said = time.monotonic() + limit, False
        while True:
            try:
                connection = dialect.loaded_dbapi.connect(*cargs, **cparams)
                if said:
                    _back_since = time.monotonic()
                return connection
            except dialect.loaded_dbapi.OperationalError as error:
                if not restarting(error, reached) or time.monotonic() > deadline:
                    raise
                if not said:
                    say(f"database unreachable ({first_line(error)}): waiting up to {limit:.0f} s")
                    said = True
                time.sleep(1)
