"""What both Flask services share: JSON errors, /health, request parsing."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from emprocess import __version__
from emprocess.errors import EmprocessError, InvalidInput, NotFound
from emprocess.models import describe_validation_error, parse

__all__ = ["create_service_app", "json_body", "parse"]

log = logging.getLogger(__name__)


def json_body() -> Any:
    """The request's JSON body, or InvalidInput naming what is wrong with it."""
    body = request.get_json(silent=True)
    if body is None:
        raise InvalidInput("request body must be JSON (Content-Type: application/json)")
    return body


def create_service_app(name: str) -> Flask:
    """A Flask app with /health and JSON errors: 400 for bad requests, 500 for ours.

    Inputs that do not exist (a missing image or bucket named in the request)
    are the caller's fault, so they are 400 too. No traceback ever goes out;
    it is logged here instead.
    """
    app = Flask(name)
    started = time.time()
    logging.basicConfig(
        level=os.environ.get("EMPROCESS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    @app.get("/health")
    def health() -> Any:
        return jsonify(
            status="ok", service=name, version=__version__, uptime_s=round(time.time() - started, 1)
        )

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
        detail = str(e) if isinstance(e, EmprocessError) else type(e).__name__
        return jsonify(error=f"internal error in {name}: {detail}"[:500]), 500

    return app
