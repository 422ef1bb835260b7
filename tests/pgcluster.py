"""A throw-away PostgreSQL cluster for the real-Airflow test: initdb, pg_ctl, stopped by PID.

Uses Debian's ``postgresql`` package (``make test`` installs it when missing). The
cluster listens on a free 127.0.0.1 port and a unix socket in its own folder. PostgreSQL
refuses to run as root, so as root the cluster belongs to the ``postgres`` user, in a
fresh temporary folder that user can reach (pytest's tmp_path is private to root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from emprocess.localrun import free_port


def pg_bin() -> Path | None:
    """The folder of Debian's PostgreSQL server programs (initdb, pg_ctl, postgres)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class PgCluster:
    """A running cluster: its SQLAlchemy URL (psycopg2), data folder and postmaster PID."""

    url: str
    data: Path
    pid: int


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")


@contextmanager
def pg_cluster(tmp_path: Path, max_connections: int = 300) -> Iterator[PgCluster]:
    """Start a cluster in ``tmp_path`` (as root: a temp folder owned by ``postgres``)."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's postgresql")
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="emprocess-pg-")) if as_root else tmp_path / "pg"
    base.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if as_root:
        user = pwd.getpwnam("postgres")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    data, sock, logfile = base / "data", base / "sock", base / "postgres.log"
    port = free_port()
    pid = 0
    try:
        _run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust",
              "--encoding=UTF8", "--no-sync"])  # fmt: skip
        sock.mkdir()
        if as_root:
            os.chown(sock, user.pw_uid, user.pw_gid)
        # A test database: durability off, enough connections for every task process.
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} "
            f"-c max_connections={max_connections} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off"
        )
        _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", opts,
              "-w", "start"])  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        _run([*prefix, str(bindir / "createdb"), "-h", str(sock), "-p", str(port), "-U", "airflow",
              "airflow"])  # fmt: skip
        yield PgCluster(f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow", data, pid)
    finally:
        if pid:
            _stop(pid)
        if as_root:
            shutil.rmtree(base, ignore_errors=True)


def _stop(pid: int, timeout_s: float = 20.0) -> None:
    """Fast shutdown of the postmaster started here (SIGINT), then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
