"""Google ID tokens for calling Cloud Run services, refreshed before they expire.

Only ``https`` endpoints get a token (a local service on ``http://127.0.0.1`` needs
none). Tokens come from google-auth's ``fetch_id_token`` with the service URL as
audience: on Composer / GCE from the metadata server, elsewhere from a service
account key in ``GOOGLE_APPLICATION_CREDENTIALS``; never from a ``gcloud`` shell-out.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

REFRESH_MARGIN_S = 300.0
"""Fetch a new token when the current one expires within this many seconds."""

DEFAULT_LIFETIME_S = 3600.0


def _google_fetch(audience: str) -> str:
    import google.auth.transport.requests
    import google.oauth2.id_token

    token: str = google.oauth2.id_token.fetch_id_token(
        google.auth.transport.requests.Request(), audience
    )
    return token


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim (Unix seconds) of a JWT, read without verifying it; None if absent."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


class IdTokenSource:
    """A callable giving a valid ID token for ``audience``; thread-safe, cached until near expiry."""

    def __init__(
        self,
        audience: str,
        fetch: Callable[[str], str] = _google_fetch,
        refresh_margin_s: float = REFRESH_MARGIN_S,
    ) -> None:
        self.audience = audience
        self._fetch = fetch
        self._margin = refresh_margin_s
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0

    def __call__(self) -> str:
        with self._lock:
            if self._token is None or time.time() >= self._expires - self._margin:
                token = self._fetch(self.audience)
                self._expires = token_expiry(token) or time.time() + DEFAULT_LIFETIME_S
                self._token = token
                log.info("fetched an ID token for %s", self.audience)
            return self._token


def audience_of(base_url: str) -> str:
    """The audience Cloud Run expects: the service URL's scheme and host."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}"


def token_source_for(base_url: str) -> IdTokenSource | None:
    """An ID token source for an ``https`` service, None for plain ``http``."""
    if urlsplit(base_url).scheme != "https":
        return None
    return IdTokenSource(audience_of(base_url))
