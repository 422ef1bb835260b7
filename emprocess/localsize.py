"""How many service workers and request threads a local run uses, from the cores and memory.

A local run (``emprocess run``, ``emprocess demo``) starts each service under gunicorn
with one worker process per core, fewer when memory would not hold them at their peak,
and sends every batch task's requests over enough threads to keep all workers busy.
Only one stage runs at a time (align, then write, then shards), so each service may
have a worker per core; their peaks never add up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 1 << 30

EMWRITE_WORKER_BYTES = int(1.1 * GIB)
"""Peak RSS of an emwrite worker: a full 1024^3 /ngshard cube with the lossless pyramid
(docs/figures.md, "Throughput")."""

ALIGN_WORKER_BYTES = GIB // 2
"""Peak RSS of an alignment worker on a pair of large slices."""

RESERVE_BYTES = GIB
"""Memory left for Airflow, the idle workers of the other service and the system."""

THREADS_PER_WORKER = 2
"""Requests in flight per service worker: one computing, one queued, so no worker idles
while its last answer is cached and the next request is sent."""


@dataclass(frozen=True)
class LocalSizing:
    """Service workers and request threads of a local run."""

    cores: int
    memory_bytes: int
    align_workers: int
    emwrite_workers: int
    threads: int

    def describe(self) -> str:
        """One line for the run's output."""
        return (
            f"{self.cores} cores, {self.memory_bytes / GIB:.1f} GiB available: "
            f"align {self.align_workers} workers, emwrite {self.emwrite_workers} workers, "
            f"{self.threads} request threads per batch task"
        )

    def service_workers(self) -> dict[str, int]:
        """gunicorn workers by service name."""
        return {"align": self.align_workers, "emwrite": self.emwrite_workers}


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity, as a container limits it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo where there is one)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _fit(cores: int, memory: int, per_worker: int) -> int:
    return max(1, min(cores, (memory - RESERVE_BYTES) // per_worker))


def size_local_run(
    cores: int | None = None,
    memory_bytes: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> LocalSizing:
    """Workers per service and threads per batch task for this machine.

    Args:
        cores: cores to use (default: :func:`machine_cores`).
        memory_bytes: memory to use (default: :func:`available_memory`).
        workers: gunicorn workers of each service, overriding the sizing.
        threads: request threads per batch task, overriding the sizing.
    """
    cores = cores or machine_cores()
    memory = memory_bytes or available_memory()
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    align = workers or _fit(cores, memory, ALIGN_WORKER_BYTES)
    emwrite = workers or _fit(cores, memory, EMWRITE_WORKER_BYTES)
    return LocalSizing(
        cores=cores,
        memory_bytes=memory,
        align_workers=align,
        emwrite_workers=emwrite,
        threads=threads or THREADS_PER_WORKER * max(align, emwrite),
    )
