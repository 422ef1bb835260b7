"""gunicorn hooks of ``emprocess bench run``: each request's peak memory, in a JSON-lines file.

Added to the services' own gunicorn config (``EMPROCESS_GUNICORN_HOOKS=THIS_FILE``, read by
:mod:`emprocess.services.gunicorn_conf`), so the ``emprocess serve`` command line stays the
containers'. Before each request the worker
resets its peak resident set size to its current size (``5`` into /proc/self/clear_refs,
Linux 4.0 and later); after it, the worker's ``VmHWM`` is that request's peak: the most
memory the worker (one request at a time, as on Cloud Run with concurrency 1) held while
serving it, including what it kept from earlier requests. One line per request goes to
the file named by ``BENCH_REQUEST_LOG``, read once when gunicorn loads this file. Where
the reset is refused, ``"reset": false`` marks the peak as the worker's since it started.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

REQUEST_LOG = os.environ.get("BENCH_REQUEST_LOG", "")
"""The JSON-lines file of request figures; empty: the hooks do nothing."""


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def pre_request(worker: Any, req: Any) -> None:
    if not REQUEST_LOG:
        return
    reset = _reset_peak()
    worker.bench_request = {
        "reset": reset,
        "start": time.time(),
        "cpu0": sum(os.times()[:2]),
        "rss0_kib": _status_kib().get("VmRSS", 0),
    }


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    started = getattr(worker, "bench_request", None)
    if not REQUEST_LOG or started is None:
        return
    kib = _status_kib()
    uri = str(getattr(worker.app, "app_uri", None) or worker.cfg.wsgi_app or "")
    record = {
        "service": uri.partition(":")[0].rsplit(".", 1)[-1],  # emprocess.services.align:...
        "pid": os.getpid(),
        "method": req.method,
        "path": req.path,
        "status": int(str(getattr(resp, "status", "0")).split()[0] or 0),
        "start": started["start"],
        "end": time.time(),
        "cpu_s": sum(os.times()[:2]) - started["cpu0"],
        "rss_before_kib": started["rss0_kib"],
        "peak_kib": kib.get("VmHWM", 0),
        "reset": started["reset"],
    }
    with open(REQUEST_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")
    worker.bench_request = None
