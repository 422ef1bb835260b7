"""Helpers of the workflow tests: a tiny scriptable HTTP server and slice fixtures.

``ScriptedServer`` is a real HTTP server on 127.0.0.1 (``http.server`` in a thread).
Each request is recorded and answered by a ``respond`` callable, which lets a test
make a service flaky (503s, a slow answer that times out) or refuse a request (400),
without mocking the client.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

from emprocess import storage


@dataclass
class Request:
    method: str
    path: str
    body: Any
    headers: dict[str, str]
    number: int  # 1-based arrival order


@dataclass
class Answer:
    status: int = 200
    body: Any = "success"
    delay_s: float = 0.0


Respond = Callable[[Request], Answer]


@dataclass
class ScriptedServer:
    respond: Respond
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with lock:
                    rec = Request(
                        self.command, self.path, body, dict(self.headers), len(server.requests) + 1
                    )
                    server.requests.append(rec)
                answer = server.respond(rec)
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                is_json = not isinstance(answer.body, str)
                data = json.dumps(answer.body).encode() if is_json else answer.body.encode()
                try:
                    self.send_response(answer.status)
                    self.send_header(
                        "Content-Type", "application/json" if is_json else "text/plain"
                    )
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


def fake_emwrite_respond(req: Request) -> Answer:
    """A stand-in for emwrite that checks nothing and writes only neuroglancer/jpeg/info.

    Only for exercising the DAG's wiring until the real service runs in the tests.
    """
    if req.path == "/ngmeta":
        info = {"@type": "neuroglancer_multiscale_volume", "fake": True}
        storage.write_bytes(
            f"gs://{req.body['dest']}/neuroglancer/jpeg/info", json.dumps(info).encode()
        )
    if req.path not in ("/alignedslice", "/ngmeta", "/ngshard"):
        return Answer(404, {"error": f"no endpoint {req.path}"})
    return Answer(200, "success")


def write_slices(
    bucket: str,
    template: str,
    zs: range | list[int],
    size_xy: tuple[int, int] = (40, 30),
    ext: str = ".png",
    sizes: dict[int, tuple[int, int]] | None = None,
) -> list[str]:
    """Write small random slices ``template % z`` to ``bucket``; returns their keys."""
    rng = np.random.default_rng(0)
    keys = []
    for z in zs:
        w, h = (sizes or {}).get(z, size_xy)
        img = rng.integers(0, 255, (h, w), dtype=np.uint8)
        ok, buf = cv2.imencode(ext, img)
        assert ok
        key = template % z
        storage.write_bytes(f"gs://{bucket}/{key}", buf.tobytes())
        keys.append(key)
    return keys


class SmtpSink:
    """A minimal SMTP server on 127.0.0.1 that keeps every message it is given."""

    def __init__(self) -> None:
        import socketserver

        sink = self
        self.messages: list[dict[str, Any]] = []

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str) -> None:
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self) -> None:
                self.reply("220 sink")
                mail: dict[str, Any] = {"rcpt": []}
                while raw := self.rfile.readline():
                    cmd = raw.decode().strip()
                    verb = cmd[:4].upper()
                    if verb in ("EHLO", "HELO"):
                        self.reply("250 sink")
                    elif verb == "MAIL":
                        mail = {"from": cmd[10:], "rcpt": []}
                        self.reply("250 ok")
                    elif verb == "RCPT":
                        mail["rcpt"].append(cmd[8:])
                        self.reply("250 ok")
                    elif verb == "DATA":
                        self.reply("354 go on")
                        lines = []
                        while (line := self.rfile.readline()) not in (b".\r\n", b".\n", b""):
                            lines.append(line.decode())
                        mail["data"] = "".join(lines)
                        sink.messages.append(mail)
                        self.reply("250 queued")
                    elif verb == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("250 ok")

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def __enter__(self) -> SmtpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
