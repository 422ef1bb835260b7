"""Run the workflow on one machine: both services under gunicorn, the DAG through real Airflow.

``emprocess run`` and ``emprocess demo`` use this. The services are started as
``emprocess serve`` subprocesses on free 127.0.0.1 ports; Airflow runs the
repository's own DAG file with ``airflow dags test`` in a subprocess whose
``AIRFLOW_HOME`` (metadata database, logs) lives in the working directory. While
it runs, progress is read from the process bucket alone, the same way the
monitoring report reads it, and everything started here is stopped by PID.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from emprocess import settings, storage
from emprocess.errors import EmprocessError, NotFound
from emprocess.localsize import LocalSizing, size_local_run
from emprocess.settings import HttpEnv, StorageEnv

log = logging.getLogger(__name__)

REPO_DAG_FILE = Path(__file__).resolve().parents[1] / "emprocess.py"


class RunFailed(EmprocessError):
    """The Airflow run ended without success."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers with any HTTP status; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise EmprocessError(f"the process serving {url} exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise EmprocessError(f"{url} did not answer within {timeout_s} s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """Stop a process started here, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Services:
    """Base URLs of the running services."""

    align: str
    emwrite: str


@contextmanager
def local_services(
    log_dir: Path,
    env: dict[str, str] | None = None,
    workers: Mapping[str, int] | None = None,
    storage_settings: StorageEnv | None = None,
) -> Iterator[Services]:
    """Start the alignment and emwrite services under gunicorn; stop them on exit.

    Args:
        log_dir: gets ``align.log`` and ``emwrite.log``.
        env: extra environment of the services.
        workers: gunicorn workers by service name (default one each).
        storage_settings: where the services' storage is (default: this process's,
            :func:`emprocess.storage.settings`).
    """
    child = {**settings.environ(storage_settings or storage.settings()), **(env or {})}
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    urls = {}
    try:
        for name in ("align", "emwrite"):
            port = free_port()
            n = str((workers or {}).get(name, 1))
            argv = [sys.executable, "-m", "emprocess.cli", "serve", name, "--port", str(port)]
            with open(log_dir / f"{name}.log", "ab") as out:
                proc = subprocess.Popen(
                    [*argv, "--workers", n],
                    env={**os.environ, **child},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            urls[name] = f"http://127.0.0.1:{port}"
            wait_http(urls[name] + "/health", proc=proc)
            log.info("%s service on %s (pid %d)", name, urls[name], proc.pid)
        yield Services(align=urls["align"], emwrite=urls["emwrite"])
    finally:
        for proc in procs:
            stop_process(proc)


def airflow_env(
    home: Path, services: Services, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment for an Airflow that sees only this repository's DAG file and package."""
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    # The layout users deploy: the DAG file beside the package. The package must be
    # there because Airflow puts the DAG folder first on sys.path, where a lone
    # emprocess.py would shadow the package; .airflowignore keeps the package's
    # modules from being parsed as DAG files.
    for name, target in (
        ("emprocess.py", REPO_DAG_FILE),
        ("emprocess", REPO_DAG_FILE.with_suffix("")),
    ):
        link = dags / name
        if not link.is_symlink() or link.resolve() != target:
            link.unlink(missing_ok=True)
            link.symlink_to(target)
    (dags / ".airflowignore").write_text("emprocess/\n")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW_CONN_ALIGN_CLOUD_RUN": services.align,
        "AIRFLOW_CONN_IMG_WRITE": services.emwrite,
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra or {})
    return env


def _airflow() -> str:
    found = shutil.which("airflow", path=os.path.dirname(sys.executable)) or shutil.which("airflow")
    if not found:
        raise EmprocessError("the airflow command is not installed; install the [airflow] extra")
    return found


def ensure_airflow_db(env: dict[str, str], log_file: Path) -> None:
    """Create or upgrade the metadata database (fast when it is current)."""
    with open(log_file, "ab") as out:
        done = subprocess.run(
            [_airflow(), "db", "migrate"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise EmprocessError(f"`airflow db migrate` failed; see {log_file}")


# -- progress from the process bucket -------------------------------------------------


class RunProgress:
    """A run's progress bars, one per stage, read from its process bucket alone.

    rich draws them: on a terminal they redraw in place; in a log or a pipe each change
    is one printed line of counts (``[running] align pairs 12/24  write slices 0/12``)
    and the bars are printed once at the end.
    """

    def __init__(self, source: str, run_id: str, console: Console | None = None) -> None:
        self.source, self.run_id = source, run_id
        self.console = console or Console()
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.console,
            auto_refresh=self.console.is_terminal,
        )
        self._tasks: dict[str, TaskID] = {}
        self._last = ""

    def __enter__(self) -> RunProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def poll(self, state: str = "") -> str:
        """Read the process bucket and move the bars; returns the line of counts."""
        from emprocess.report import load_run

        try:
            stages = load_run(self.source, self.run_id, read_records=False).stages
        except NotFound:  # validate / create_env have not written the run's records yet
            stages = ()
        counts = []
        for s in (s for s in stages if not s.skipped):
            if s.label not in self._tasks:
                self._tasks[s.label] = self._bars.add_task(s.label, total=s.total)
            self._bars.update(self._tasks[s.label], total=s.total, completed=s.done)
            counts.append(f"{s.label} {s.done}/{s.total if s.total else '?'}")
        line = (f"[{state}] " if state else "") + ("  ".join(counts) or "starting ...")
        if line != self._last and not self.console.is_terminal:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._last = line
        return line


# -- the run --------------------------------------------------------------------------


def run_dag(
    conf: Any,
    dag_id: str,
    workdir: Path,
    progress: RunProgress | None = None,
    poll_s: float = 2.0,
    sizing: LocalSizing | None = None,
    services: Services | None = None,
    storage_settings: StorageEnv | None = None,
    http_settings: HttpEnv | None = None,
) -> dict[str, Any]:
    """Run ``dag_id`` on ``conf`` with local services and real Airflow; return complete.json.

    Args:
        conf: a validated :class:`emprocess.workflow.conf.RunConf`.
        dag_id: e.g. ``emprocess_width4_v0.4``.
        workdir: holds ``airflow/`` (home, database, logs) and the service logs.
        progress: the bars to move, polled every ``poll_s`` seconds.
        poll_s: seconds between progress polls of the process bucket.
        sizing: service workers and request threads (default: :func:`size_local_run`).
        services: services already running (a benchmark's stand-ins); default: start both.
        storage_settings: where the run's buckets are, for the services, Airflow and the
            progress read here (default: this process's, :func:`emprocess.storage.settings`).
        http_settings: the batch tasks' HTTP settings (default: the environment's, with
            ``sizing.threads`` request threads).

    Raises:
        RunFailed: Airflow reported failure; the message holds the log's tail.
    """
    home = workdir / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    sizing = sizing or size_local_run()
    log.info("local run: %s", sizing.describe())
    chosen = storage_settings or storage.settings()
    started = (
        nullcontext(services)
        if services
        else local_services(
            workdir / "logs", workers=sizing.service_workers(), storage_settings=chosen
        )
    )
    with storage.use(chosen), started as services:
        # `dags test` runs one task at a time, so one task's threads must fill every worker.
        http = http_settings or settings.load(HttpEnv, http_threads=sizing.threads)
        env = airflow_env(home, services, settings.environ(http, chosen))
        ensure_airflow_db(env, home / "db-migrate.log")
        run_log = home / f"run-{conf.id}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        argv = [_airflow(), "dags", "test", dag_id, "--conf", json.dumps(conf.to_json())]
        log.info("running %s; Airflow log: %s", dag_id, run_log)
        with open(run_log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
            try:
                while proc.poll() is None:
                    time.sleep(poll_s)
                    if progress:
                        progress.poll()
            finally:
                stop_process(proc)
        if progress:
            progress.poll()
        text = run_log.read_text(errors="replace")
        complete = conf.layout.records.read_complete()
        if proc.returncode != 0 or complete is None or "state=failed" in text.lower():
            tail = "\n".join(text.splitlines()[-40:])
            raise RunFailed(
                f"{dag_id} did not finish (exit {proc.returncode}); log {run_log}:\n{tail}"
            )
        return complete.to_json()
