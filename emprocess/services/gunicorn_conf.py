"""gunicorn settings of ``emprocess serve``: workers stop when their master dies.

gunicorn's sync worker notices a dead master only between requests (it waits up to half
the worker timeout for one), so a master killed with SIGKILL left a worker holding the
port: a restarted service could not bind, and the orphan went on until one more request.
Each worker asks Linux for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), which
gunicorn handles as a graceful stop: the request in hand finishes (and its answer is
cached), then the worker exits and the port is free. Loaded with
``gunicorn -c python:emprocess.services.gunicorn_conf``.

``EMPROCESS_GUNICORN_HOOKS`` may name a Python file whose ``pre_request`` and
``post_request`` hooks are added (``emprocess bench run`` measures each request's peak
memory so, with the command line the containers use: gunicorn reads one config file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal the calling process gets when its parent dies."""

log = logging.getLogger(__name__)


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: SIGTERM when the master dies (Linux); exit if it already has."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != server.pid:  # the master died before the request above
        os._exit(0)


def _request_hooks(path: str) -> dict[str, Any]:
    """``pre_request`` / ``post_request`` of the Python file at ``path``."""
    spec = importlib.util.spec_from_file_location("emprocess_gunicorn_hooks", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"EMPROCESS_GUNICORN_HOOKS={path!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {n: getattr(module, n) for n in ("pre_request", "post_request") if hasattr(module, n)}


if os.environ.get("EMPROCESS_GUNICORN_HOOKS"):  # read once, when gunicorn loads this file
    globals().update(_request_hooks(os.environ["EMPROCESS_GUNICORN_HOOKS"]))
