"""A small HTTP proxy in front of a real server that records requests and injects faults.

Tests use it to see exactly what a client sent (method, path, body) and to make
the upstream look flaky (503s) or refuse (403), without mocking the client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    body: bytes


# A rule sees a request and may answer it instead of the upstream: (status, body) or None.
Rule = Callable[[Recorded], tuple[int, bytes] | None]


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    answered: list[Recorded] = field(default_factory=list)
    """Requests the upstream has answered (before the answer is passed on)."""
    hold: threading.Event | None = None
    """When set to an unset Event, upstream answers wait for it before they go out."""

    def __post_init__(self) -> None:
        up = urlsplit(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rec = Recorded(self.command, self.path, body)
                proxy.requests.append(rec)
                for rule in list(proxy.rules):
                    answer = rule(rec)
                    if answer is not None:
                        status, payload = answer
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                proxy.answered.append(rec)
                if proxy.hold is not None:
                    proxy.hold.wait()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)  # fails when a test killed the client
                conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def fail_first(n: int, status: int, match: Callable[[Recorded], bool] = lambda r: True) -> Rule:
    """A rule answering ``status`` to the first ``n`` matching requests."""
    left = [n]

    def rule(rec: Recorded) -> tuple[int, bytes] | None:
        if left[0] > 0 and match(rec):
            left[0] -= 1
            return status, json.dumps({"error": {"code": status, "message": "injected"}}).encode()
        return None

    return rule
