"""``emprocess serve``: a service under gunicorn, as its container runs it."""

from __future__ import annotations

import typer

SERVE_TIMEOUT_S = 900
"""gunicorn's worker timeout, here and in the containers: a stuck worker is restarted."""

WORKER_CLASS = "emprocess.services.worker.DeadlineSyncWorker"
"""gunicorn's sync worker that runs a request once received, here and in the containers."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

SERVICES = {
    "align": "emprocess.services.align:create_app()",
    "emwrite": "emprocess.services.emwrite:create_app()",
}


MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial value, kept fixed (the containers set it too)


def serve(
    service: str = typer.Argument(..., help="Which service: align or emwrite."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps it local."),
    port: int = typer.Option(8080, min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, help="gunicorn worker processes."),
    threads: int = typer.Option(1, min=1, help="Threads per worker (Cloud Run: 1)."),
    timeout: int = typer.Option(
        SERVE_TIMEOUT_S, min=0, help="Seconds a request may take; 0 = no limit."
    ),
) -> None:
    """Run a service under gunicorn, as its container does (one worker, one request at a time).

    A request runs once it has arrived, within 10 s of its connection (a slow client
    cannot hold the worker); on a loopback address the service answers only a loopback Host
    (EMPROCESS_ALLOWED_HOSTS), so a web page cannot reach it by DNS rebinding.
    """
    import os
    import shutil
    import sys

    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose from {sorted(SERVICES)}")
    _require_service_extra(service)
    # As in the containers: glibc's per-thread malloc arenas strand the buffers that
    # tensorstore's threads free, which nearly doubles the peak RSS of /ngshard.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    # And a fixed mmap threshold: glibc raises it (up to 32 MiB) as large blocks are
    # freed, after which tensorstore's chunk buffers stay in the heap once freed; an
    # RGB 1024^3 /ngshard cube peaked 13% higher (1.97 against 1.74 GiB).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    if host in LOCAL_HOSTS:  # only local names in Host: no DNS rebinding from a web page
        os.environ.setdefault("EMPROCESS_ALLOWED_HOSTS", ",".join(LOCAL_HOSTS))
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    argv = [
        gunicorn,
        "--config", GUNICORN_CONFIG,
        "--bind", f"{host}:{port}",
        "--workers", str(workers),
        "--threads", str(threads),
        "--timeout", str(timeout),
        # More threads: gunicorn's gthread worker (which it picks itself for a plain sync).
        "--worker-class", WORKER_CLASS if threads == 1 else "gthread",
        SERVICES[service],
    ]  # fmt: skip
    os.execv(gunicorn, argv) if os.path.isabs(gunicorn) else os.execvp(gunicorn, argv)


GUNICORN_CONFIG = "python:emprocess.services.gunicorn_conf"
"""Its workers stop when their master is killed (no orphan keeps the port)."""
SERVICE_MODULES = {"align": ("flask", "gunicorn"), "emwrite": ("flask", "gunicorn", "tensorstore")}


def _require_service_extra(service: str) -> None:
    """Stop with the extra to install when the service's packages are missing."""
    import importlib.util

    missing = [m for m in SERVICE_MODULES[service] if importlib.util.find_spec(m) is None]
    if missing:
        typer.echo(
            f"error: emprocess serve {service} needs {', '.join(missing)}: "
            f"pip install -e '.[{service}]' (or '.[airflow-server]' for everything the "
            "self-managed Airflow needs)",
            err=True,
        )
        raise typer.Exit(1)
