"""MLflow's SQLite tracking store, built holding a lock: commands that start at once on a new
database take turns creating its tables instead of running MLflow's migrations side by side.

pyproject.toml declares ``sqlite_tracking_store`` the ``mlflow.tracking_store`` plugin for ``sqlite:``
URIs, so every MLflow process of this environment builds its SQLite stores here, `mlflow run`'s own
(which migrates a new store before any code of this project runs) included. MLflow imports this
module while it is imported itself, so MLflow is imported only inside the function.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


def sqlite_tracking_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's SqlAlchemyStore for ``store_uri``, built holding ``flock`` on ``<database file>.lock``: once the
    tables exist, only while MLflow checks them (a file open)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_WORKSPACES
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.store.tracking.sqlalchemy_workspace_store import WorkspaceAwareSqlAlchemyStore
    from sqlalchemy.engine import make_url

    store_class = WorkspaceAwareSqlAlchemyStore if MLFLOW_ENABLE_WORKSPACES.get() else SqlAlchemyStore
    # Stands in for MLflow's own lock around creating tables (mlflow.store.db.utils._safe_initialize_tables): it
    # is private, and SqlAlchemyStore.__init__ migrates a new database without it.
    with database_lock(make_url(store_uri).database):
        return store_class(store_uri, artifact_uri or DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)


@contextmanager
def database_lock(database: str | None):
    """``flock`` on ``<database>.lock`` for the block: exclusive, dropped by the kernel when the holder
    dies. None for an in-memory database (one process's own) or a folder nobody can write in."""
    if not database or database == ":memory:":
        yield
        return
    try:
        Path(database).parent.mkdir(parents=True, exist_ok=True)  # as MLflow makes it for the database
        lock = os.open(f"{database}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # read-only: nobody can create or migrate a database there either
        yield
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # closing the descriptor drops the lock
