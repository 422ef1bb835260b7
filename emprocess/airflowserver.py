"""A self-managed Airflow 3 on this machine: api-server, scheduler and dag-processor.

The README's "Self-managed Airflow 3" section spells out the same steps by hand; this
module does them for ``emprocess run --scheduler`` and the real-Airflow test: the DAG
folder laid out as users deploy it (``localrun.airflow_env``), one environment for every
process (connections, storage root, executor, database, shared JWT secret), the
metadata database migrated, the pool created, a user with a known password, the three
processes on 127.0.0.1, and all of them stopped by PID (with their children) on exit.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emprocess import settings
from emprocess.errors import EmprocessError
from emprocess.localrun import RunProgress, Services, _airflow, airflow_env, free_port, wait_http
from emprocess.settings import StorageEnv
from emprocess.workflow import POOL, POOL_SLOTS

log = logging.getLogger(__name__)

USERNAME = "emprocess"
POOL_DESCRIPTION = "emprocess batch tasks: each sends HTTP mini-tasks to the services"
PROCESSES = ("api-server", "scheduler", "dag-processor")


@dataclass
class AirflowServer:
    """A running Airflow: its REST API URL, a user, its environment and processes."""

    api_url: str
    username: str
    password: str
    env: dict[str, str]
    home: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    api_workers: int = 1

    def log_text(self, name: str) -> str:
        """The log of one of the processes (``api-server``, ``scheduler``, ``dag-processor``)."""
        return (self.home / f"{name}.log").read_text(errors="replace")

    def start(self, name: str) -> None:
        """Start one of the processes in its own process group (its log appended to)."""
        args = [name] + (["--workers", str(self.api_workers)] if name == "api-server" else [])
        with open(self.home / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [_airflow(), *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("airflow %s started (pid %d)", name, self.procs[name].pid)

    def restart(self, name: str, down_s: float = 0.0) -> None:
        """Stop one process with its children (SIGTERM to its group), wait ``down_s``,
        start it again: an api-server restart or upgrade as an operator does it."""
        stop_groups([self.procs[name]])
        time.sleep(down_s)
        self.start(name)


def server_env(
    home: Path,
    services: Services,
    api_port: int,
    *,
    db_url: str | None = None,
    parallelism: int = 32,
    storage_settings: StorageEnv | None = None,
    password: str,
) -> dict[str, str]:
    """The environment every Airflow process of the installation gets (the README lists it)."""
    extra = {
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        # Tokens the api-server signs must verify in every process: one shared secret.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API__EXPOSE_CONFIG": "True",  # lets `emprocess trigger` check parallelism
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    if db_url:
        extra["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = db_url
    if storage_settings is not None:
        extra.update(settings.environ(storage_settings))
    (home / "passwords.json").write_text(json.dumps({USERNAME: password}))
    return airflow_env(home, services, extra)


def _run_cli(env: dict[str, str], args: list[str], log_file: Path) -> None:
    with open(log_file, "ab") as out:
        done = subprocess.run([_airflow(), *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise EmprocessError(f"`airflow {' '.join(args)}` failed; see {log_file}")


def stop_groups(procs: list[subprocess.Popen], timeout_s: float = 5.0) -> None:
    """Stop processes started here in their own sessions, with their children, by PID.

    SIGTERM to every group at once, then SIGKILL to any group still there after
    ``timeout_s`` (the group id is the PID of the process started here).
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
        if all(proc.poll() is not None for proc in procs):
            return


@contextmanager
def airflow_server(
    home: Path,
    services: Services,
    *,
    db_url: str | None = None,
    parallelism: int = 32,
    api_workers: int = 1,
    pool_slots: int = POOL_SLOTS,
    storage_settings: StorageEnv | None = None,
    start_timeout_s: float = 120.0,
) -> Iterator[AirflowServer]:
    """Migrate the database, create the pool, start the three processes; stop them on exit.

    Args:
        home: AIRFLOW_HOME (dags/, logs, process logs; the SQLite file if no ``db_url``).
        services: the align and emwrite services the connections point to.
        db_url: SQLAlchemy URL of the metadata database; None for SQLite in ``home``.
        parallelism: ``[core] parallelism``: tasks running at once (LocalExecutor workers).
        api_workers: api-server worker processes (tasks read and write XComs through it).
        storage_settings: the storage of every process (``EMPROCESS_STORAGE_*``; None:
            what the environment says).
    """
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    password = secrets.token_urlsafe(12)
    env = server_env(
        home, services, port, db_url=db_url, parallelism=parallelism,
        storage_settings=storage_settings, password=password,
    )  # fmt: skip
    _run_cli(env, ["db", "migrate"], home / "db-migrate.log")
    server = AirflowServer(
        f"http://127.0.0.1:{port}", USERNAME, password, env, home, api_workers=api_workers
    )
    try:
        for name in PROCESSES:
            server.start(name)
        # While the api-server starts up (the pool only has to exist before a run).
        _run_cli(env, ["pools", "set", POOL, str(pool_slots), POOL_DESCRIPTION], home / "cli.log")
        wait_http(
            f"{server.api_url}/api/v2/monitor/health",
            timeout_s=start_timeout_s,
            proc=server.procs["api-server"],
        )
        yield server
    finally:
        stop_groups(list(server.procs.values()))


def wait_for_dag(server: AirflowServer, dag_id: str, timeout_s: float = 120.0) -> None:
    """Wait until the dag-processor has parsed ``dag_id`` into the database."""
    from emprocess.airflow_api import AirflowApi

    api = AirflowApi(server.api_url)
    api.login(server.username, server.password)
    deadline = time.monotonic() + timeout_s
    while api.dag(dag_id) is None:
        for name, proc in server.procs.items():
            if proc.poll() is not None:
                raise EmprocessError(f"airflow {name} exited ({proc.returncode}); see its log")
        if time.monotonic() > deadline:
            raise EmprocessError(f"DAG {dag_id} did not appear within {timeout_s} s")
        time.sleep(1.0)


def run_with_scheduler(
    conf: Any,
    dag_id: str,
    width: int,
    workdir: Path,
    progress: RunProgress | None = None,
    db_url: str | None = None,
    poll_s: float = 2.0,
    workers: Mapping[str, int] | None = None,
    storage_settings: StorageEnv | None = None,
) -> dict[str, Any]:
    """``emprocess run --scheduler``: the run through a real api-server, scheduler and REST API.

    As on Composer: pools, concurrency limits and the REST API all apply. The database
    is SQLite in ``workdir/airflow-server`` unless ``db_url`` names another (SQLite holds
    one run at a time; see the README). ``storage_settings`` says where the run's buckets
    are, for every process (default: this process's). Returns complete.json.

    Raises:
        RunFailed: the run failed; the message names the task that failed first.
    """
    from emprocess import storage
    from emprocess.airflow_api import FOLLOW_RETRY_S, AirflowApi
    from emprocess.localrun import RunFailed, local_services
    from emprocess.trigger import check_ready, follow_run, trigger_run

    chosen = storage_settings or storage.settings()
    with (
        storage.use(chosen),
        local_services(workdir / "logs", workers=workers, storage_settings=chosen) as services,
        airflow_server(
            workdir / "airflow-server",
            services,
            db_url=db_url,
            parallelism=max(32, width + 4),
            storage_settings=chosen,
        ) as server,
    ):
        wait_for_dag(server, dag_id)
        api = AirflowApi(server.api_url)
        api.login(server.username, server.password)
        check_ready(api, dag_id, width, unpause=True)
        run_id = f"{conf.id}-{time.strftime('%Y%m%dT%H%M%S')}"  # a re-run redoes nothing cached
        trigger_run(api, dag_id, run_id, conf.to_json())
        api.retry_s = FOLLOW_RETRY_S  # sent: from now on an api-server hiccup is waited out
        on_poll = progress.poll if progress else None
        outcome = follow_run(api, dag_id, run_id, on_poll, poll_s=poll_s)
        if outcome.state == "success":
            complete = conf.layout.records.read_complete()
            if complete is None:
                raise RunFailed(f"{dag_id} run {run_id} succeeded but wrote no complete.json")
            return complete.to_json()
    raise RunFailed(
        f"{dag_id} run {run_id} {outcome.state}: failed tasks {outcome.failed}: "
        f"{outcome.error}; logs in {workdir / 'airflow-server' / 'logs'}"
    )
