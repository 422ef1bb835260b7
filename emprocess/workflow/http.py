"""The one HTTP client of the workflow: a JSON POST with timeouts, retries, backoff and jitter.

Requests always have a timeout. Connection errors, timeouts, 408, 429 and 5xx are
retried (tenacity) with exponential backoff and jitter; any other 4xx is the caller's
fault and fails at once with the service's message. How many tries, how long to wait and
the timeouts come from :class:`emprocess.settings.HttpEnv` (``EMPROCESS_HTTP_*``), built
once by the task and handed down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random_exponential,
)

from emprocess.errors import EmprocessError
from emprocess.settings import HttpEnv

log = logging.getLogger(__name__)

TokenSource = Callable[[], str]
"""Gives a bearer token per request (a Google ID token for Cloud Run)."""


class ServiceError(EmprocessError):
    """A service answered with an error, or could not be reached; names the request."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        attempts: int = 1,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.attempts = attempts
        """Requests sent before giving up."""
        self.retry_after_s = retry_after_s
        """The service's Retry-After, seconds."""


def retry_wait(settings: HttpEnv) -> Callable[[RetryCallState], float]:
    """tenacity's wait after a failed try: doubling, jittered, capped, or Retry-After.

    After try n the wait lies between half and all of ``min(http_max_backoff_s,
    http_backoff_s * 2**(n-1))``: tenacity's exponential wait for half of it plus its
    random exponential wait for the other half. A longer Retry-After of the service (up
    to ``http_max_backoff_s``) wins.
    """
    half = {"multiplier": settings.http_backoff_s / 2, "max": settings.http_max_backoff_s / 2}
    jittered = wait_exponential(**half) + wait_random_exponential(**half)

    def wait(state: RetryCallState) -> float:
        delay = float(jittered(state))
        error = state.outcome.exception() if state.outcome else None
        retry_after = error.retry_after_s if isinstance(error, ServiceError) else None
        if retry_after is not None:
            delay = max(delay, min(retry_after, settings.http_max_backoff_s))
        return delay

    return wait


def connection_base_url(
    conn_type: str | None, host: str | None, port: int | None, schema: str | None
) -> str:
    """The base URL of an Airflow HTTP connection (``ALIGN_CLOUD_RUN``, ``IMG_WRITE``).

    ``AIRFLOW_CONN_IMG_WRITE=http://127.0.0.1:8080`` gives type "http", host and port;
    ``https://svc-xyz.a.run.app`` gives type "https". A host that already holds a
    scheme is used as is; otherwise ``schema`` (where the http provider keeps it), then
    the connection type, then "http" give the scheme.
    """
    if not host:
        raise EmprocessError(
            f"connection of type {conn_type!r} has no host; set it to the service URL"
        )
    if "://" in host:
        return host.rstrip("/")
    if schema in ("http", "https"):
        scheme = schema
    elif conn_type in ("http", "https"):
        scheme = conn_type
    else:
        scheme = "http"
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _excerpt(response: requests.Response, limit: int = 500) -> str:
    text = response.text or ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        text = json.dumps(body["error"]) if not isinstance(body["error"], str) else body["error"]
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "")


def is_retryable_status(status: int) -> bool:
    """408 (request timeout), 429 (slow down) and every 5xx are worth another try."""
    return status in (408, 429) or status >= 500


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _post_once(
    session: requests.Session,
    url: str,
    payload: Mapping[str, Any],
    settings: HttpEnv,
    token_source: TokenSource | None,
    extra_headers: Mapping[str, str] | None = None,
) -> Any:
    """One POST: the JSON answer (or text); a :class:`ServiceError` that says whether to retry."""
    headers = dict(extra_headers or {})
    if token_source:
        headers["Authorization"] = f"Bearer {token_source()}"
    timeout = (settings.http_connect_timeout_s, settings.http_timeout_s)
    try:
        response = session.post(url, json=payload, headers=headers, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise ServiceError(f"POST {url} failed: {type(e).__name__}: {e}", retryable=True) from e
    if not response.ok:
        raise ServiceError(
            f"POST {url} answered {response.status_code}: {_excerpt(response)}",
            retryable=is_retryable_status(response.status_code),
            status=response.status_code,
            retry_after_s=_retry_after(response),
        )
    try:
        return response.json()
    except ValueError:
        return response.text


class _Aborted(Exception):
    """The batch was aborted while a request waited for its next try."""


def post_json(
    session: requests.Session,
    url: str,
    payload: Mapping[str, Any],
    settings: HttpEnv,
    token_source: TokenSource | None = None,
    abort: threading.Event | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[Any, int]:
    """POST ``payload`` to ``url`` with retries; returns (parsed answer, attempts used).

    The answer is the JSON body, or the text when it is not JSON. tenacity retries the
    retryable errors (:func:`is_retryable_status`, connection errors, timeouts) up to
    ``settings.http_attempts`` tries, waiting :func:`retry_wait`; ``abort`` ends a wait.

    Raises:
        ServiceError: at once on a non-retryable 4xx, or when the attempts run out.
    """
    failed: list[ServiceError] = []  # the error each wait follows

    def log_retry(state: RetryCallState) -> None:
        error = cast(ServiceError, state.outcome.exception() if state.outcome else None)
        failed.append(error)  # only ServiceErrors are retried
        delay = state.upcoming_sleep
        n = state.attempt_number
        log.warning("%s; retry %d/%d in %.1f s", error, n, settings.http_attempts - 1, delay)

    def sleep(delay: float) -> None:
        if abort is None:
            time.sleep(delay)
        elif abort.wait(delay):
            raise _Aborted

    retrying = Retrying(
        stop=stop_after_attempt(settings.http_attempts),
        wait=retry_wait(settings),
        retry=retry_if_exception(lambda e: isinstance(e, ServiceError) and e.retryable),
        before_sleep=log_retry,
        sleep=sleep,
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                answer = _post_once(session, url, payload, settings, token_source, headers)
    except ServiceError as e:
        n = len(failed) + 1
        if e.retryable:
            raise ServiceError(
                f"{e} (after {n} attempts)", retryable=True, status=e.status, attempts=n
            ) from None
        e.attempts = n
        raise
    except _Aborted:
        last = failed[-1]
        raise ServiceError(
            f"{last} (batch aborted)", retryable=False, status=last.status, attempts=len(failed)
        ) from None
    return answer, len(failed) + 1
