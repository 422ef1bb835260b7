"""The one fan-out helper: a worker's share of a stage's mini-tasks, POSTed over threads.

Every batch task of the DAG calls :func:`run_batch`. A stage is planned as a list of
:class:`MiniTask` (index, name, endpoint, JSON payload); worker ``w`` of ``W`` owns the
mini-tasks with ``index % W == w``. Each answer is cached as one JSON object under the
stage's cache prefix in the process bucket, named after the mini-task and a digest of
its request, so a retried or cleared task (or a re-triggered run with the same
requests) skips finished work, found with one listing of the prefix (in DAGs of width
:data:`CHECK_EACH_MIN_WIDTH` and more, by looking up each of its own answers).

A mini-task that finally fails leaves a failure record ``NAME.json`` under the stage's
failure prefix (``RUN_ID/failures/STAGE/`` in the process bucket) for the monitoring
report; its later success deletes the record.

Each request goes through the one HTTP client, :func:`emprocess.workflow.http.post_json`
(timeouts, retries with backoff and jitter); the answers through the one answer cache,
:class:`emprocess.answers.AnswerCache`. ``http_threads=1`` runs inline, for debugging.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import requests

from emprocess.answers import AnswerCache, answer_key, answer_record, request_headers
from emprocess.errors import EmprocessError
from emprocess.records import FailureRecords, now_iso
from emprocess.settings import HttpEnv, load
from emprocess.workflow.http import (
    ServiceError,
    TokenSource,
    connection_base_url,
    is_retryable_status,
    post_json,
)

__all__ = [  # the HTTP client's and the failure records' names, importable from here as before
    "FailureRecords",
    "ServiceError",
    "TokenSource",
    "connection_base_url",
    "is_retryable_status",
    "post_json",
]

log = logging.getLogger(__name__)

STAGGER_MIN_WIDTH = 32
"""Batch tasks of DAGs at least this wide start staggered, so serverless services scale up."""

STAGGER_MAX_S = 60.0
"""Longest start delay of a staggered batch task, s."""

CHECK_EACH_MIN_WIDTH = 64
"""From this width a batch task looks up its own mini-tasks' answers one by one (in
parallel) instead of listing the stage's cache: a listing returns the answers of all
``width`` tasks, 1,000 per sequential page, so at 50,000 slices and width 128 each of the
128 tasks would read 50 pages (150 for the alignment pairs) for the 390 (1,170) it owns;
looked up over the request threads those take a few rounds, and the stage reads N
objects in all, not width x N."""


class BatchError(EmprocessError):
    """Some mini-tasks of a batch failed; the message names them and why."""

    def __init__(
        self, stage: str, failures: list[tuple[str, str]], total: int, client_error: bool = False
    ) -> None:
        shown = "; ".join(f"{name}: {why}" for name, why in failures[:20])
        more = f"; and {len(failures) - 20} more" if len(failures) > 20 else ""
        super().__init__(f"{stage}: {len(failures)} of {total} mini-tasks failed: {shown}{more}")
        self.failures = failures
        self.client_error = client_error
        """True when a service refused a request (4xx): retrying the task will not help."""


@dataclass(frozen=True)
class MiniTask:
    """One request of a stage.

    Attributes:
        index: position in the stage's plan; worker ``index % width`` sends it.
        name: readable id for logs, errors and the cache object, e.g. ``z000012``.
        path: endpoint on the service, e.g. ``/alignedslice``.
        payload: the JSON body.
        inputs: a digest of what earlier stages produced that the service reads but the
            payload does not name (the tiles of an /ngshard cube: the cache keys of the
            /alignedslice requests that wrote them); part of the cache key, not sent.
        cost: the work it asks for, in any unit shared by its stage (an /ngshard cube's
            voxels); a batch task sends its costliest mini-tasks first, so the last ones
            are short and the service's workers finish together. Not sent, not cached.
    """

    index: int
    name: str
    path: str
    payload: Mapping[str, Any]
    inputs: str = ""
    cost: float = 0.0

    def cache_key(self) -> str:
        """``NAME.DIGEST.json``; the digest changes when the request or its inputs do."""
        return answer_key(self.name, self.path, self.payload, self.inputs)


def stagger_s(settings: HttpEnv, worker_id: int, width: int) -> float:
    """Start delay of a worker: none below ``STAGGER_MIN_WIDTH``, else a ramp of
    ``stagger_step_s`` per worker id up to ``STAGGER_MAX_S``."""
    if width < STAGGER_MIN_WIDTH:
        return 0.0
    return min(STAGGER_MAX_S, worker_id * settings.stagger_step_s)


@dataclass
class BatchSummary:
    """What one batch task did (returned through XCom, summed up in complete.json)."""

    stage: str
    worker_id: int
    width: int
    planned: int
    cached: int = 0
    sent: int = 0
    attempts: int = 0
    started: str = ""
    finished: str = ""
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def select_worker(tasks: Sequence[MiniTask], worker_id: int, width: int) -> list[MiniTask]:
    """The mini-tasks of worker ``worker_id`` of ``width``: those with index % width == worker_id."""
    if width < 1 or not 0 <= worker_id < width:
        raise EmprocessError(f"worker_id {worker_id} is outside 0..{width - 1} (width {width})")
    return [t for t in tasks if t.index % width == worker_id]


def cached_keys(cache_url: str) -> set[str]:
    """Keys (relative to ``cache_url``) of the cached answers, from one listing
    (:meth:`AnswerCache.keys`)."""
    return AnswerCache(cache_url).keys()


def cached_among(tasks: Sequence[MiniTask], cache_url: str, threads: int = 16) -> set[str]:
    """Cache keys of ``tasks`` whose answer is cached, one existence check each
    (:meth:`AnswerCache.present`)."""
    return AnswerCache(cache_url).present([t.cache_key() for t in tasks], threads)


def read_cached(tasks: Iterable[MiniTask], cache_url: str, threads: int = 16) -> dict[str, Any]:
    """The cached answers (``response``) of ``tasks``, by mini-task name
    (:meth:`AnswerCache.responses`).

    Raises:
        ObjectNotFound: when one of them has not been answered yet.
    """
    return AnswerCache(cache_url).responses({t.name: t.cache_key() for t in tasks}, threads)


def read_answered(
    tasks: Sequence[MiniTask], cache_url: str, what: str, sent_by: str
) -> dict[str, Any]:
    """The cached answers of ``tasks`` (:func:`read_cached`), for a task that only computes
    from what the batch task ``sent_by`` sent.

    Raises:
        EmprocessError: naming the mini-tasks with no answer yet (``what``: what they are,
            e.g. "pairs across bad slices"): ``sent_by`` has not run, or failed.
    """
    done = cached_keys(cache_url)
    missing = [t.name for t in tasks if t.cache_key() not in done]
    if missing:
        raise EmprocessError(
            f"{len(missing)} of {len(tasks)} {what} have no answer in {cache_url}: "
            f"{', '.join(missing[:10])}; run {sent_by} first"
        )
    return read_cached(tasks, cache_url)


def run_batch(
    tasks: Sequence[MiniTask],
    *,
    base_url: str,
    cache_url: str,
    worker_id: int = 0,
    width: int = 1,
    stage: str = "batch",
    settings: HttpEnv | None = None,
    token_source: TokenSource | None = None,
    failure_url: str | None = None,
    redo: Collection[str] | Callable[[list[MiniTask]], Collection[str]] = (),
    run_id: str | None = None,
) -> BatchSummary:
    """Send this worker's mini-tasks to the service and cache every answer.

    Args:
        tasks: the stage's plan: every worker's mini-tasks, or only this worker's
            (with their indexes in the whole plan).
        base_url: the service, e.g. ``http://127.0.0.1:8080`` or a Cloud Run URL.
        cache_url: the stage's cache prefix in the process bucket.
        worker_id: this worker, 0 <= worker_id < width.
        width: the number of workers of the stage.
        stage: name for logs and errors.
        settings: threads, timeouts and retries (default: read from the environment).
        token_source: gives a bearer token per request; default: a Google ID token for
            ``https`` URLs (:func:`emprocess.workflow.auth.token_source_for`), none for http.
        failure_url: the stage's failure prefix in the process bucket
            (``RUN_ID/failures/STAGE``): a mini-task that finally fails writes ``NAME.json``
            there, and its success (now or found cached) deletes it. None: no records.
        redo: names of mini-tasks to send even when their answer is cached, because
            what they wrote is gone (e.g. tiles the tmp bucket's lifecycle deleted); or
            a function of this worker's cached mini-tasks giving those names, so the
            check costs nothing when none is cached (a first run).
        run_id: the run's id: each request then names its answer's key in headers, and
            the service caches the answer itself as it finishes (:mod:`emprocess.answers`),
            so what finished after this task died is not sent again. None: only here.

    Raises:
        BatchError: naming the mini-tasks that failed and why (after finishing or, on a
            non-retryable 4xx, abandoning the others).
    """
    settings = settings or load(HttpEnv)
    cache = AnswerCache(cache_url)
    mine = select_worker(tasks, worker_id, width)
    summary = BatchSummary(stage=stage, worker_id=worker_id, width=width, planned=len(mine))
    summary.started = now_iso()
    t0 = time.monotonic()
    if not mine:
        done: set[str] = set()
    elif width >= CHECK_EACH_MIN_WIDTH:
        done = cache.present([t.cache_key() for t in mine], settings.http_threads)
    else:
        done = cache.keys()
    if callable(redo):
        cached = [t for t in mine if t.cache_key() in done]
        redo = redo(cached) if cached else ()
    done -= {t.cache_key() for t in mine if t.name in redo}
    # Costliest first (a stable sort: plan order among equals), so no large request is
    # left to start last while the other workers run out of work.
    todo = sorted((t for t in mine if t.cache_key() not in done), key=lambda t: -t.cost)
    summary.cached = len(mine) - len(todo)
    records = FailureRecords(failure_url if mine else None, stage)
    for task in mine:
        if task.cache_key() in done:
            records.clear(task)
    log.info(
        "%s worker %d/%d: %d mini-tasks, %d cached, %d to send to %s over %d threads",
        stage,
        worker_id,
        width,
        len(mine),
        summary.cached,
        len(todo),
        base_url,
        settings.http_threads,
    )
    if todo:
        if token_source is None:
            from emprocess.workflow.auth import token_source_for

            token_source = token_source_for(base_url)
        delay = stagger_s(settings, worker_id, width)
        if delay:
            log.info("%s worker %d: staggered start, waiting %.1f s", stage, worker_id, delay)
            time.sleep(delay)
        _send_all(todo, base_url, cache, stage, settings, token_source, summary, records, run_id)
    summary.finished = now_iso()
    summary.elapsed_s = round(time.monotonic() - t0, 3)
    return summary


def _send_all(
    todo: list[MiniTask],
    base_url: str,
    cache: AnswerCache,
    stage: str,
    settings: HttpEnv,
    token_source: TokenSource | None,
    summary: BatchSummary,
    records: FailureRecords,
    run_id: str | None = None,
) -> None:
    abort = threading.Event()
    local = threading.local()
    lock = threading.Lock()
    failures: list[tuple[str, str]] = []
    client_error = threading.Event()
    progress_every = max(1, len(todo) // 10)

    def send(task: MiniTask) -> None:
        if abort.is_set():
            with lock:
                failures.append((task.name, "not sent: batch aborted after a client error"))
            return
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        url = base_url.rstrip("/") + task.path
        t_start = time.monotonic()
        attempts = 0
        key = task.cache_key()
        headers = request_headers(run_id, key, task.inputs) if run_id else None
        try:
            answer, attempts = post_json(
                session, url, task.payload, settings, token_source, abort, headers
            )
            record = answer_record(
                task.name, task.path, task.payload, answer, attempts, time.monotonic() - t_start
            )
            cache.write(key, record)
        except ServiceError as e:
            if not e.retryable:
                client_error.set()
                abort.set()
            with lock:
                failures.append((task.name, str(e)))
            records.write(task, str(e), e.status, e.attempts)
            return
        except Exception as e:  # a storage failure while caching: report it with the task
            with lock:
                failures.append((task.name, f"{type(e).__name__}: {e}"))
            records.write(task, f"{type(e).__name__}: {e}", None, attempts)
            return
        records.clear(task)
        with lock:
            summary.sent += 1
            summary.attempts += attempts
            if summary.sent % progress_every == 0:
                log.info("%s: %d/%d mini-tasks done", stage, summary.sent, len(todo))

    if settings.http_threads <= 1:
        for task in todo:
            send(task)
    else:
        with ThreadPoolExecutor(
            max_workers=settings.http_threads, thread_name_prefix=stage
        ) as pool:
            list(pool.map(send, todo))
    if failures:
        # Client errors first: they are the reason the rest was abandoned.
        failures.sort(key=lambda f: f[1].startswith("not sent"))
        raise BatchError(stage, failures, len(todo), client_error=client_error.is_set())
