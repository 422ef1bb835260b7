"""Phases of the emwrite benchmark, each run in a fresh ``spawn`` process: its CPU and
wall seconds and its own peak RSS (:func:`run_phase`), and the environment it starts with."""

from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cv2

from emprocess import storage

CONTAINER_MALLOC_ARENA_MAX = 2  # as emwrite_docker/Dockerfile sets it


def _cpu_s() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def _phase_alignedslice(bodies: list[dict]) -> None:
    from emprocess.models import AlignedSliceRequest
    from emprocess.services.emwrite import aligned_slice

    for body in bodies:
        aligned_slice(AlignedSliceRequest.model_validate(body))


def _phase_ngshard(meta: dict, source: str) -> None:
    from emprocess.kernels.ngmeta import plan_cubes
    from emprocess.models import NgMetaRequest, NgShardRequest
    from emprocess.services.emwrite import ng_meta, ng_shard

    ng_meta(NgMetaRequest.model_validate(meta))
    for start in plan_cubes(tuple(meta["bbox"]), meta["minz"], meta["maxz"]):
        ng_shard(NgShardRequest.model_validate({**meta, "source": source, "start": list(start)}))


_PHASES: dict[str, Callable[..., None]] = {
    "alignedslice": _phase_alignedslice,
    "ngshard": _phase_ngshard,
}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    ``VmHWM`` of /proc/self/status where it exists: Linux carries ``ru_maxrss`` over
    ``execve``, so a process spawned by a large parent would report the parent's
    size; the high-water mark of the process's own address space does not.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(name: str, args: tuple, cv_threads: int, conn: Any) -> None:
    """Run one phase and send back its CPU, wall and peak RSS figures."""
    try:
        cv2.setNumThreads(cv_threads)
        import tensorstore  # noqa: F401  (imports are not part of the measured work)

        import emprocess.services.emwrite  # noqa: F401

        rss0 = peak_rss_mib()
        cpu0, wall0 = _cpu_s(), time.perf_counter()
        _PHASES[name](*args)
        cpu, wall = _cpu_s() - cpu0, time.perf_counter() - wall0
        peak = peak_rss_mib()
        conn.send({"cpu_s": cpu, "wall_s": wall, "peak_rss_mib": peak, "base_rss_mib": rss0})
    except BaseException as e:
        conn.send({"error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        conn.close()


def clear_buckets(*buckets: str) -> None:
    """Delete every object of these buckets (between repeats)."""
    for bucket in buckets:
        for key in storage.list_keys(storage.bucket_url(bucket, "")):
            storage.delete(storage.bucket_url(bucket, key))


@contextmanager
def _package_importable() -> Iterator[None]:
    """Hide sys.path folders where a lone emprocess.py (a DAG file) would shadow the package.

    A spawned process starts with its parent's sys.path; once Airflow has loaded a DAG
    folder it is first there (tests, a run on an Airflow worker), and ``import
    emprocess_bench.emwrite_phases`` (where :func:`_child` lives) in the child would find
    the DAG file instead.
    """
    import sys

    saved = list(sys.path)
    sys.path[:] = [
        p
        for p in saved
        if not (os.path.isfile(os.path.join(p or ".", "emprocess.py")))
        or os.path.isdir(os.path.join(p or ".", "emprocess"))
    ]
    try:
        yield
    finally:
        sys.path[:] = saved


def run_phase(
    name: str,
    *args: Any,
    cv_threads: int = 1,
    repeats: int = 1,
    fresh: Callable[[], None] | None = None,
    env: dict[str, str | None] | None = None,
) -> dict[str, float]:
    """Run phase ``name`` in ``repeats`` fresh spawned processes, one after the other.

    ``fresh`` runs in this process before each repeat, unmeasured: it deletes what
    the phase writes, so every repeat writes new objects as a run does (replacing a
    4.6 MB file cost 4 ms more than creating one on this machine's disk). ``env`` is
    the phase process's environment on top of this one's (default: :func:`phase_env`
    of this process's storage settings).

    Returns:
        The fastest run's CPU and wall seconds (the machine may be shared) and the
        largest peak RSS in MiB (``base_rss_mib``: after imports, before the work).
    """
    ctx = multiprocessing.get_context("spawn")
    env = phase_env() if env is None else env
    runs = []
    for _ in range(repeats):
        if fresh is not None:
            fresh()
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(name, args, cv_threads, send))
        with _package_importable(), environment(**env):
            proc.start()
        send.close()
        try:
            result = recv.recv()
        except EOFError:
            result = {"error": "the phase process died without an answer"}
        proc.join()
        if "error" in result or proc.exitcode != 0:
            raise RuntimeError(f"phase {name} failed (exit {proc.exitcode}): {result.get('error')}")
        runs.append(result)
    return {
        "cpu_s": min(r["cpu_s"] for r in runs),
        "wall_s": min(r["wall_s"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "base_rss_mib": max(r["base_rss_mib"] for r in runs),
    }


@contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, for None, remove) environment variables meanwhile; children inherit them.

    Only around the start of a phase process: ``multiprocessing`` has no ``env`` argument,
    so this is how a spawned process gets its own environment (as ``Popen(env=...)``).
    """
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def phase_env(
    tile_codec: str | None = None, malloc_arena_max: int | None = CONTAINER_MALLOC_ARENA_MAX
) -> dict[str, str | None]:
    """The environment a phase process starts with, as a service's container gets it.

    The storage settings in force here (:func:`emprocess.storage.settings`, so the phase
    reads and writes where this process does), the service settings with ``tile_codec``
    (None: the environment's), and glibc's ``MALLOC_ARENA_MAX`` (None: glibc's default).
    """
    from emprocess import settings

    service = settings.load(
        settings.ServiceEnv, **({} if tile_codec is None else {"tile_codec": tile_codec})
    )
    env: dict[str, str | None] = {**settings.environ(storage.settings(), service)}
    env["MALLOC_ARENA_MAX"] = None if malloc_arena_max is None else str(malloc_arena_max)
    return env


@contextmanager
def storage_root(root: str | None) -> Iterator[str]:
    """Storage under ``root`` (or a fresh temporary folder) meanwhile, in this process
    (:func:`emprocess.storage.use`) and, through :func:`phase_env`, in the phases."""
    from emprocess.settings import StorageEnv, load

    with tempfile.TemporaryDirectory(prefix="bench-emwrite-") as tmp:
        path = root or tmp
        with storage.use(load(StorageEnv, storage_root=path)):
            yield path
