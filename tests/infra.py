"""Throwaway shared infrastructure on loopback: a PostgreSQL cluster and an MLflow server (basic-auth optional).

Plain context managers, used by the test fixtures (``tests/servers.py``) and the load test
(``benchmarks/load_test.py``). Everything they write stays in the folder they are given (as root, a
cluster in a temp folder that it links to), and everything they start is stopped on exit, also when
the body raises.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

MISSING_POSTGRES = "PostgreSQL server binaries (initdb, pg_ctl) not found: run .ci/run, which installs Debian's postgresql"


class InfraError(RuntimeError):
    """A server could not be started; the message says why and shows its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


# --- PostgreSQL -----------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """The folder holding initdb and pg_ctl: Debian's newest /usr/lib/postgresql/<version>/bin, else PATH."""
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    raise InfraError(MISSING_POSTGRES)


@dataclass(frozen=True)
class Postgres:
    """A running cluster: a superuser `postgres` with a password, reachable over TCP on 127.0.0.1."""

    port: int
    password: str
    data: Path  # the cluster's data folder
    run_as: tuple[str, ...] = ()  # the command prefix its tools run under (as root: the postgres user)
    host: str = "127.0.0.1"

    def stop(self) -> None:
        """Stop the server as an upgrade does: fast, open connections are cut."""
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        # -l: without it the server would write to our pipe, which then never reaches end of file
        self._pg_ctl("-l", str(self.data.parent / "postgres.log"), "start")

    def _pg_ctl(self, *args: str) -> None:
        command = [*self.run_as, str(postgres_bindir() / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise InfraError(f"pg_ctl {args[-1]} failed:\n{done.stdout}{done.stderr}")

    def create_database(self, name: str) -> str:
        """A fresh database owned by a fresh login role of the same name; its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        password = secrets.token_hex(16)  # hex: nothing to escape in a URL
        # autocommit: CREATE DATABASE refuses to run inside a transaction
        with psycopg.connect(
            host=self.host, port=self.port, user="postgres", password=self.password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
        return f"postgresql://{name}:{password}@{self.host}:{self.port}/{name}"


@contextmanager
def _cluster_folder(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """The folder a cluster lives in, and the command prefix its tools run under; PostgreSQL refuses to run as root.

    As root the tools run as Debian's `postgres` system user, in a temp folder of its own that ``folder/cluster``
    links to, removed on exit: another pytest session resets pytest's base folder (/tmp/pytest-of-root) to 0700
    when it starts, which would shut a cluster inside it out of its own files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield folder, []
        return
    home = Path(tempfile.mkdtemp(prefix="postgres-"))
    try:
        (folder / "cluster").symlink_to(home)
        shutil.chown(home, "postgres", "postgres")
        for parent in home.parents:  # pass through (not list) the folders above it, if the temp folder is private
            if not parent.stat().st_mode & 0o001:
                parent.chmod(parent.stat().st_mode | 0o001)
        yield home, ["runuser", "-u", "postgres", "--"]
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def postgres_cluster(folder: Path, max_connections: int = 300) -> Iterator[Postgres]:
    """initdb a cluster in ``folder``, start it on a free port, stop it on exit."""
    bindir = postgres_bindir()
    with _cluster_folder(folder) as (folder, as_postgres):
        data, log, pwfile = folder / "data", folder / "postgres.log", folder / "pwfile"
        password = secrets.token_hex(16)
        pwfile.write_text(password + "\n")
        if as_postgres:
            shutil.chown(pwfile, "postgres", "postgres")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*as_postgres, *args], capture_output=True, text=True)

        done = run(
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        )
        pwfile.unlink()
        if done.returncode != 0:
            raise InfraError(f"initdb failed:\n{done.stdout}{done.stderr}")
        port = free_port()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{folder}'\n"
                f"max_connections = {max_connections}\n"
            )
        done = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        if done.returncode != 0:
            raise InfraError(f"PostgreSQL did not start:\n{done.stdout}{done.stderr}\n--- {log} ---\n{log_tail(log)}")
        try:
            yield Postgres(port=port, password=password, data=data, run_as=tuple(as_postgres))
        finally:
            stopped = run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop")
            if stopped.returncode != 0:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")


# --- MLflow server ------------------------------------------------------------------------------


class MlflowServer:
    """A running `mlflow server`; with basic-auth, its admin's credentials (else ``admin`` is None)."""

    def __init__(self, command: list[str], env: dict[str, str], folder: Path, uri: str, admin: tuple[str, str] | None):
        self.command, self.server_env, self.folder, self.uri, self.admin = command, env, folder, uri, admin
        self.log = folder / "mlflow-server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        with open(self.log, "ab") as log_file:
            # Its own process group: the uvicorn supervisor and its workers all stop with one signal.
            self.process = subprocess.Popen(
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.server_env,
                cwd=self.folder,
                start_new_session=True,
            )
        _wait_healthy(self.process, self.uri, self.log, timeout)

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process)
            self.process = None

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop it as a service manager does (SIGTERM), stay down ``down_seconds``, and start the
        same command on the same port."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def create_user(self, username: str, password: str) -> None:
        """A new non-admin user; it gets the server's default_permission (READ) everywhere."""
        from mlflow.server.auth.routes import CREATE_USER

        response = requests.post(
            self.uri + CREATE_USER, json={"username": username, "password": password}, auth=self.admin, timeout=30
        )
        response.raise_for_status()

    def grant(self, username: str, experiment_id: str, permission: str) -> None:
        """Give ``username`` READ, USE, EDIT, MANAGE or NO_PERMISSIONS on one experiment."""
        from mlflow.server.auth.routes import GRANT_USER_PERMISSION

        response = requests.post(
            self.uri + GRANT_USER_PERMISSION,
            auth=self.admin,
            timeout=30,
            json={"username": username, "resource_type": "experiment", "resource_id": experiment_id, "permission": permission},
        )
        response.raise_for_status()

    def env(self, username: str, password: str) -> dict[str, str]:
        """The environment variables a worker process needs to log to this server as ``username``."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}


@contextmanager
def mlflow_server(
    folder: Path,
    backend_store_uri: str,
    auth_database_uri: str | None = None,
    workers: int | None = None,
    auth_cache_ttl: int = 60,
    artifacts: tuple[str, ...] = ("--artifacts-destination", "artifacts"),
    job_execution: bool = True,
    timeout: float = 300.0,
) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free port, in ``folder``; stop it and its workers on exit.

    Runs and experiments go to ``backend_store_uri``. With ``auth_database_uri``, basic-auth is on,
    as docs/scale-out.md sets it up (users and permissions there, default permission READ);
    ``auth_cache_ttl`` seconds: how long a worker trusts a checked password; 0 hashes it on every
    request (MLflow's default), seconds of CPU per request on a loaded 2-core machine.
    ``artifacts``: the flags that say where artifacts go, paths relative to ``folder``. By default
    the server proxies them into ``folder/artifacts`` (runs get ``mlflow-artifacts:`` URIs); ``()``
    is MLflow's default (also proxied), ``("--no-serve-artifacts",)`` has clients write them
    themselves. ``workers``: None is MLflow's default. ``job_execution=False``: without the job
    runner (GenAI jobs, unused here), as docs/scale-out.md starts it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "MLFLOW_SERVER_"))}
    if not job_execution:
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # uvicorn kills a worker that misses its 5 s health ping; on a loaded 2-core CI machine a worker
    # still importing MLflow misses it, and the restarted one again ("Child process [..] died").
    env.setdefault("UVICORN_TIMEOUT_WORKER_HEALTHCHECK", "60")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri, *artifacts]
    command += ["--host", "127.0.0.1", "--port", str(port)] + (["--workers", str(workers)] if workers else [])
    admin = None
    if auth_database_uri:
        admin = ("admin", secrets.token_hex(16))
        auth_config = folder / "basic_auth.ini"
        auth_config.write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {auth_database_uri}\n"
            f"admin_username = {admin[0]}\nadmin_password = {admin[1]}\nauth_cache_ttl_seconds = {auth_cache_ttl}\n"
        )
        auth_config.chmod(0o600)  # it holds the admin password
        # basic-auth's CSRF protection needs a secret key
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(auth_config), MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
        command += ["--app-name", "basic-auth"]
    server = MlflowServer(command, env, folder, f"http://127.0.0.1:{port}", admin)
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()


def _wait_healthy(server: subprocess.Popen, uri: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise InfraError(f"mlflow server exited with {server.returncode}:\n--- {log} ---\n{log_tail(log)}")
        try:
            if requests.get(uri + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # not listening yet, or still loading the app
            pass
        time.sleep(0.5)
    raise InfraError(f"mlflow server not healthy at {uri} after {timeout:.0f} s:\n--- {log} ---\n{log_tail(log)}")


def _stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    # Workers may outlive the supervisor by a moment; the group id is still theirs.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
