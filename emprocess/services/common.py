"""What both Flask services share: JSON errors, /health, request parsing and its limits."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from emprocess import __version__, answers, storage
from emprocess.errors import EmprocessError, InvalidInput, NotFound
from emprocess.models import describe_validation_error, parse
from emprocess.settings import ServiceEnv, StorageEnv, load
from emprocess.storage.failures import describe_failure

__all__ = ["create_service_app", "json_body", "parse"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
"""Largest request body; a real one is under 2 KB (a legacy one carries a short script)."""
MAX_JSON_DEPTH = 16
"""Deepest nesting of arrays and objects in a body; real ones nest 3 deep."""


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def json_body() -> Any:
    """The request's JSON body, or InvalidInput naming what is wrong with it.

    The body is at most ``MAX_BODY_BYTES`` (413 beyond, also when it comes chunked,
    without a Content-Length) and nests at
    most ``MAX_JSON_DEPTH`` levels; ``NaN`` and ``Infinity``, which are not JSON, are
    refused.
    """
    if request.content_length is None:  # chunked: read one byte past the limit to know
        data = request.environ["wsgi.input"].read(MAX_BODY_BYTES + 1)
        if len(data) > MAX_BODY_BYTES:
            raise RequestEntityTooLarge(f"a chunked body over {MAX_BODY_BYTES} bytes")
    else:
        data = request.get_data(cache=False)
    try:
        body = json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise InvalidInput(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        ) from None
    except ValueError as e:
        raise InvalidInput(
            f"request body must be JSON (Content-Type: application/json): {str(e)[:200]}"
        ) from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise InvalidInput(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        )
    g.json_body = body  # for the answer the service caches itself (after_request)
    return body


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def allowed_hosts(setting: str) -> frozenset[str]:
    """The host names of ``ServiceEnv.allowed_hosts`` (lowercase); empty: any host."""
    return frozenset(h.strip().lower() for h in setting.split(",") if h.strip())


def host_name(host_header: str) -> str:
    """The host of a Host header without its port (``[::1]:8080`` -> ``::1``), lowercase."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def refuse_headers(hosts: frozenset[str]) -> tuple[str, int] | None:
    """Why the current request is refused by its headers, and the status; None: accepted.

    A web page the user visits can post to a local service without a preflight only
    as ``text/plain``, a form or multipart, and reach it under another name only by DNS
    rebinding (its own Host): so a POST must say ``Content-Type: application/json``
    (415 otherwise), and with ``hosts`` set the Host must be one of them (400).
    """
    if hosts:
        host = request.headers.get("Host", "")
        if host_name(host) not in hosts:
            return (
                f"Host {host[:100]!r} is not one this service answers ({', '.join(sorted(hosts))})",
                400,
            )
    if request.method == "POST" and request.mimetype != "application/json":
        shown = (request.content_type or "none")[:100]
        return f"Content-Type must be application/json, got {shown!r}", 415
    return None


def configure_process(env: ServiceEnv) -> None:
    """What a service process sets once, at start-up: its storage settings, read from the
    environment (a bad ``EMPROCESS_STORAGE_*`` stops the service here, naming it, not at
    its first request), and OpenCV's own pixel limit.

    OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` at its first decode and has no other
    setting for it; a value already in the environment is kept.
    """
    storage.configure(load(StorageEnv))
    largest = max(env.align_max_pixels, env.emwrite_max_pixels)
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(largest))


def create_service_app(name: str, env: ServiceEnv | None = None) -> Flask:
    """A Flask app with /health and JSON errors: 400 for bad requests, 500 for ours.

    Inputs that do not exist (a missing image or bucket named in the request)
    are the caller's fault, so they are 400 too. No traceback ever goes out;
    it is logged here instead.

    Args:
        name: the service's name, in /health and in messages.
        env: the service's settings, read once by its ``create_app`` (None: read here).
    """
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    started = time.time()
    env = env or load(ServiceEnv)
    configure_process(env)
    hosts = allowed_hosts(env.allowed_hosts)
    logging.basicConfig(
        level=env.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info("%s: %s", name, storage.backend_description())

    @app.before_request
    def check_headers() -> Any:
        refusal = refuse_headers(hosts)
        if refusal is not None:
            log.info("%d %s %s: %s", refusal[1], request.method, request.path, refusal[0])
            return jsonify(error=refusal[0]), refusal[1]
        return None

    @app.get("/health")
    def health() -> Any:
        return jsonify(
            status="ok", service=name, version=__version__, uptime_s=round(time.time() - started, 1)
        )

    @app.before_request
    def start_clock() -> None:
        g.started = time.monotonic()

    @app.after_request
    def cache_answer(response: Response) -> Response:
        # The client may have died while this request ran: cache its answer here too.
        if response.status_code == 200 and request.headers.get(answers.KEY_HEADER):
            answers.write_service_answer(
                request.path,
                g.get("json_body"),
                {name: request.headers.get(name, "") for name in answers.HEADERS},
                response.get_data(),
                time.monotonic() - g.get("started", time.monotonic()),
            )
        return response

    @app.errorhandler(InvalidInput)
    @app.errorhandler(NotFound)
    def bad_request(e: EmprocessError) -> Any:
        log.info("400 %s %s: %s", request.method, request.path, e)
        return jsonify(error=str(e)), 400

    @app.errorhandler(ValidationError)
    def invalid_model(e: ValidationError) -> Any:
        return bad_request(InvalidInput(describe_validation_error(e)))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Any:
        return jsonify(error=f"{e.code} {e.name}: {e.description}"), e.code

    @app.errorhandler(Exception)
    def internal_error(e: Exception) -> Any:
        log.exception("500 %s %s", request.method, request.path)
        # A storage failure says its cause and object (gs://B/K), never a server path.
        if failed := describe_failure(e, storage.local_root()):
            return jsonify(error=f"{name}: storage failed: {failed}"[:500]), 500
        detail = str(e) if isinstance(e, EmprocessError) else type(e).__name__
        return jsonify(error=f"internal error in {name}: {detail}"[:500]), 500

    return app
