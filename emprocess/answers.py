"""A mini-task's cached answer: its key, its record, and the copy the service writes itself.

The batch client caches every answer (:class:`~emprocess.records.AnswerRecord`) as
``NAME.DIGEST.json`` under its stage's cache prefix in the run's process bucket
(:func:`answer_key`: the digest covers the endpoint, the payload and, for a cube, the
inputs it reads). :class:`AnswerCache` is the one owner of those keys: it builds, lists,
parses, reads and writes them for the batch tasks, the DAG's checks and the report. When the client dies while its
requests are still being carried out (a killed batch task), the services finish them but
nobody would cache them, and the retried task would send them again. So the client also
names the answer in headers (the payload, and with it every cache key, stays as it was)
and the service writes the same record once it has finished, before it answers
(:func:`write_service_answer`); the client still writes it too. Both writes are of the
same key, so either may come first.

The service trusts nothing in those headers: it derives the run's process bucket and
the stage's cache prefix from the request itself and the run id, as
:class:`emprocess.layout.RunLayout` names them, checks that the name is the one of this
request (slice, cube, pair) and recomputes the digest; any mismatch writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from emprocess import layout, storage
from emprocess.errors import InvalidInput
from emprocess.records import AnswerRecord, now_iso, parse_record

log = logging.getLogger(__name__)

RUN_HEADER = "X-Emprocess-Run"
"""The run id of the mini-task (the align request's payload does not name it)."""
KEY_HEADER = "X-Emprocess-Answer-Key"
"""``NAME.DIGEST.json``: the key the client caches the answer under."""
INPUTS_HEADER = "X-Emprocess-Inputs"
"""The mini-task's inputs digest (an /ngshard cube's tiles), part of the key, not sent."""
HEADERS = (RUN_HEADER, KEY_HEADER, INPUTS_HEADER)

CACHE_OF_PATH = {
    "/": layout.CACHES[layout.STAGE_AFFINE],
    "/alignedslice": layout.CACHES[layout.STAGE_WRITE],
    "/ngmeta": layout.CACHES[layout.STAGE_NGMETA],
    "/ngshard": layout.CACHES[layout.STAGE_NGSHARD],
}
"""The cache prefix (under ``RUN_ID/`` in the process bucket) of each endpoint's answers."""


def answer_key(name: str, path: str, payload: Mapping[str, Any], inputs: str = "") -> str:
    """``NAME.DIGEST.json``; the digest changes when the request or its inputs do."""
    request: dict[str, Any] = {"path": path, "payload": payload}
    if inputs:
        request["inputs"] = inputs
    body = json.dumps(request, sort_keys=True)
    return f"{name}.{hashlib.sha256(body.encode()).hexdigest()[:12]}.json"


def answer_name(key: str) -> str | None:
    """The mini-task name of cache key ``key``: ``z000012`` of ``z000012.0123456789ab.json``;
    None for anything else (another file, a key with a folder)."""
    parts = key.split(".")
    if len(parts) != 3 or parts[2] != "json" or "/" in key:
        return None
    return parts[0]


class AnswerCache:
    """One stage's cached answers: ``NAME.DIGEST.json`` objects under one prefix.

    The one owner of the cache's keys: it builds them (:meth:`key`, :func:`answer_key`),
    parses them (:meth:`name_of`), lists, checks, reads and writes the answers as
    :class:`~emprocess.records.AnswerRecord`. The batch tasks, the checks of the DAG and
    the monitoring report all go through it.

    Args:
        url: the stage's cache prefix, e.g. ``gs://SOURCE_process/RUN_ID/align/affine_cache``.
    """

    key = staticmethod(answer_key)
    name_of = staticmethod(answer_name)

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @classmethod
    def of_stage(cls, run: layout.RunLayout, stage: str) -> AnswerCache:
        """The cache of ``stage`` (:data:`emprocess.layout.CACHES`) of run ``run``."""
        return cls(run.process_url(layout.CACHES[stage]))

    def url_of(self, key: str) -> str:
        """The URL of the answer cached under ``key``."""
        return storage.join(self.url, key)

    def listing(self) -> dict[str, storage.ObjectInfo]:
        """Every object of the cache by key (relative to the prefix), from one listing;
        its update time is when its mini-task finished."""
        prefix = self.url + "/"
        start = len(storage.parse_url(prefix).key)
        return {info.key[start:]: info for info in storage.list_objects(prefix)}

    def keys(self) -> set[str]:
        """The keys of the cached answers, from one listing."""
        prefix = self.url + "/"
        start = len(storage.parse_url(prefix).key)
        return {k[start:] for k in storage.list_keys(prefix)}

    def present(self, keys: Iterable[str], threads: int = 16) -> set[str]:
        """Those of ``keys`` that are cached, one existence check each (in parallel)."""
        keys = list(keys)
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            found = list(pool.map(lambda k: storage.exists(self.url_of(k)), keys))
        return {k for k, ok in zip(keys, found, strict=True) if ok}

    def read(self, key: str) -> AnswerRecord:
        """The answer cached under ``key``.

        Raises:
            ObjectNotFound: when it has not been answered yet.
            MalformedRecord: when the object is not an answer record.
        """
        url = self.url_of(key)
        return parse_record(AnswerRecord, storage.read_bytes(url), url)

    def responses(self, keys: Mapping[str, str], threads: int = 16) -> dict[str, Any]:
        """The services' answers (``response``) of mini-tasks ``{name: key}``, by name.

        Raises:
            ObjectNotFound: when one of them has not been answered yet.
        """
        names = list(keys)

        def read(name: str) -> Any:
            return self.read(keys[name]).response

        if threads <= 1 or len(names) <= 1:
            return {name: read(name) for name in names}
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return dict(zip(names, pool.map(read, names), strict=True))

    def write(self, key: str, record: AnswerRecord) -> str:
        """Cache ``record`` under ``key``; returns its URL."""
        url = self.url_of(key)
        storage.write_bytes(url, record.to_bytes(), content_type="application/json")
        return url


def answer_record(
    name: str,
    path: str,
    payload: Mapping[str, Any],
    response: Any,
    attempts: int,
    elapsed_s: float,
    by: str = "client",
) -> AnswerRecord:
    """The cached record of an answer (``response`` is what the batch tasks read back).

    ``by`` says who wrote it: the client, with its attempts and the time from its first
    request to the answer, or the service, with 1 (the request that finished) and the
    time it took; the client's record replaces the service's when the client lives.
    """
    return AnswerRecord(
        name=name,
        path=path,
        request=dict(payload),
        response=response,
        attempts=attempts,
        elapsed_s=round(elapsed_s, 3),
        finished=now_iso(),
        by=by,
    )


def request_headers(run_id: str, key: str, inputs: str = "") -> dict[str, str]:
    """The headers that let the service cache the answer under ``key``."""
    headers = {RUN_HEADER: run_id, KEY_HEADER: key}
    if inputs:
        headers[INPUTS_HEADER] = inputs
    return headers


def _source_of(path: str, payload: Mapping[str, Any], run_id: str) -> str:
    """The run's source bucket, from the request itself."""
    if path == "/":
        source = storage.parse_url(str(payload.get("pre", ""))).bucket
    elif path == "/alignedslice":
        if payload.get("run_id") != run_id:
            raise InvalidInput(f"run_id {payload.get('run_id')!r} is not the header's {run_id!r}")
        source = str(payload.get("dest", ""))
    else:  # a volume request names the run's ng bucket, SOURCE_ng_RUN_ID
        dest, suffix = str(payload.get("dest", "")), f"_ng_{run_id}"
        if not dest.endswith(suffix):
            raise InvalidInput(f"dest {dest!r} is not the ng bucket of run {run_id!r}")
        source = dest.removesuffix(suffix)
    return storage.check_bucket_name(source)


def _expected_name(path: str, payload: Mapping[str, Any], name: str) -> bool:
    """Whether ``name`` is the mini-task name of this request."""
    try:
        if path == "/":  # slice names follow the run's template: the digest binds the rest
            pre, post = layout.parse_pair_name(name)
            return pre < post
        if path == "/alignedslice":
            return name == layout.slice_task_name(int(payload["slice"]))
        if path == "/ngshard":
            x, y, z = (int(v) for v in payload["start"])
            return name == layout.cube_name(x, y, z)
        return name == layout.NGMETA
    except (KeyError, TypeError, ValueError):
        return False


def service_answer_url(
    path: str, payload: Mapping[str, Any], headers: Mapping[str, str]
) -> str | None:
    """Where the service caches this request's answer; None when the request asks none.

    Raises:
        InvalidInput: the headers do not fit the request (another run, name or digest).
    """
    run_id, key = headers.get(RUN_HEADER), headers.get(KEY_HEADER)
    if not run_id or not key or path not in CACHE_OF_PATH:
        return None
    storage.check_run_id(run_id)
    name = answer_name(key) or ""
    if not _expected_name(path, payload, name):
        raise InvalidInput(f"answer key {key[:80]!r} is not named after this {path} request")
    if answer_key(name, path, payload, headers.get(INPUTS_HEADER, "")) != key:
        raise InvalidInput(f"answer key {key[:80]!r} is not the digest of this request")
    run = layout.RunLayout(_source_of(path, payload, run_id), run_id)
    return AnswerCache(run.process_url(CACHE_OF_PATH[path])).url_of(key)


def write_service_answer(
    path: str,
    payload: Mapping[str, Any] | None,
    headers: Mapping[str, str],
    body: bytes,
    elapsed_s: float,
) -> str | None:
    """Cache a finished request's answer as the client would; returns the URL written.

    Never raises: the client writes the same record, so a failure here costs at most a
    repeated request after a client died; it is logged.
    """
    if not isinstance(payload, Mapping):
        return None
    try:
        url = service_answer_url(path, payload, headers)
        if url is None:
            return None
        try:
            response: Any = json.loads(body)
        except ValueError:
            response = body.decode(errors="replace")
        name = url.rsplit("/", 1)[-1].partition(".")[0]
        record = answer_record(name, path, payload, response, 1, elapsed_s, by="service")
        storage.write_bytes(url, record.to_bytes(), content_type="application/json")
        return url
    except Exception as e:  # the client caches it too: never fail the request for this
        log.warning("answer of %s not cached by the service: %s", path, e)
        return None
