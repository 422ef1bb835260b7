"""The local data server: folders over HTTP the way GCS serves a public bucket."""

from __future__ import annotations

import logging
import mimetypes
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import HTTPException
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler
from werkzeug.utils import send_file
from werkzeug.wrappers import Request, Response

from emprocess.errors import NotFound
from emprocess.view.state import NEUROGLANCER_APP
from emprocess.volume import INFO

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

_MAX_RECORDS = 10_000


@dataclass(frozen=True)
class RequestRecord:
    """One request the data server answered."""

    method: str
    path: str
    range: str | None
    status: int


_CORS = {
    "Access-Control-Expose-Headers": "Content-Range, Content-Length, Accept-Ranges, Content-Type, ETag",
    "Vary": "Origin",
}
DATA_SERVER_THREADS = 8
"""Requests the data server answers at once; more connections wait to be accepted."""
DATA_SERVER_READ_TIMEOUT_S = 10.0
"""A client that sends nothing for this long is dropped (a slow one cannot hold a thread)."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_ORIGINS = frozenset({NEUROGLANCER_APP.rstrip("/")})
"""Origins answered with CORS by default: the public neuroglancer app (``serve_run`` adds
its own viewer's); another web page the user visits gets no CORS, so cannot read data."""
_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "Range, Content-Type, If-None-Match",
    "Access-Control-Max-Age": "3600",
}


class _DataApp:
    """The WSGI app of :class:`DataServer`: files under the mounts, CORS on every answer.

    werkzeug's ``send_file(conditional=True)`` answers the byte ranges (206, or 416 for a
    range the file cannot satisfy) and the conditional requests (ETag, 304).
    """

    def __init__(
        self, mounts: Mapping[str, Path], origins: Iterable[str], hosts: frozenset[str]
    ) -> None:
        self.origins = set(origins)
        self.hosts = hosts  # empty: any Host
        # Longest prefix first, so "a/b" wins over "a".
        self.mounts = sorted(
            ((tuple(p for p in k.split("/") if p), Path(v).resolve()) for k, v in mounts.items()),
            key=lambda kv: -len(kv[0]),
        )
        self.records: deque[RequestRecord] = deque(maxlen=_MAX_RECORDS)
        self.records_lock = threading.Lock()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self._answer(request)
        except HTTPException as e:  # 416 from send_file, with its Content-Range
            response = e.get_response(environ)
        response.headers.update(_CORS)
        origin = request.headers.get("Origin")
        if origin is not None and origin in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
        rec = RequestRecord(
            request.method,
            environ.get("REQUEST_URI") or request.full_path,
            request.headers.get("Range"),
            response.status_code,
        )
        with self.records_lock:
            self.records.append(rec)
        return response(environ, start_response)

    def _answer(self, request: Request) -> Response:
        if self.hosts and _host_name(request.host) not in self.hosts:
            return _plain(400, "bad request: Host is not this server's")  # DNS rebinding
        if request.method == "OPTIONS":
            return Response(status=204, headers=_PREFLIGHT)
        if request.method not in ("GET", "HEAD"):
            return _plain(405, "method not allowed")
        target = self._resolve(request.path)
        if isinstance(target, int):
            return _plain(target, {400: "bad request", 403: "forbidden"}.get(target, "not found"))
        ctype = "application/json" if target.name == INFO else None
        ctype = ctype or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        try:
            return send_file(target, request.environ, mimetype=ctype, conditional=True)
        except OSError:  # gone, or unreadable, since _resolve looked
            return _plain(404, "not found")

    def _resolve(self, path: str) -> Path | int:
        """The file a (decoded) request path names, or the HTTP status to refuse it with."""
        if "\x00" in path:  # a NUL (raw or %00) names no file: a bad request
            return 400
        parts = path.split("/")
        if any(p in ("..", ".") or "\\" in p for p in parts):
            return 403
        parts = [p for p in parts if p]
        for prefix, root in self.mounts:
            if tuple(parts[: len(prefix)]) == prefix:
                target = root.joinpath(*parts[len(prefix) :]).resolve()
                if not target.is_relative_to(root):  # e.g. a symlink out of the folder
                    return 403
                if not target.is_file():
                    return 404
                # A hard link may be a file from anywhere (the volumes' writers rename
                # whole files into place: one link each).
                return target if target.stat().st_nlink == 1 else 403
        return 404


def _host_name(host: str) -> str:
    """The host of a Host header without its port, lowercase."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class _BoundedServer(ThreadedWSGIServer):
    """werkzeug's threaded server with at most ``DATA_SERVER_THREADS`` requests at once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(DATA_SERVER_THREADS)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.slots.acquire()  # in the accepting thread: beyond the bound, connections wait
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status=status, mimetype="text/plain")


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's request handler, logging each request at DEBUG instead of INFO."""

    timeout = DATA_SERVER_READ_TIMEOUT_S

    def log(self, type: str, message: str, *args: Any) -> None:
        log.debug("data server: " + message, *args)


class DataServer:
    """Serves local folders over HTTP the way GCS serves a public bucket to neuroglancer.

    werkzeug serves the files: byte ranges (206 Partial Content, which sharded volumes
    need; 416 for one the file cannot satisfy, or several), ETags with 304 Not Modified,
    HEAD; we add OPTIONS preflight and CORS for the ``origins`` neuroglancer runs in (not
    ``*``: another page the user visits cannot read the data). Paths outside the folders,
    and hard links, are refused (403), missing files are 404. Bound to a loopback address,
    it answers only requests whose Host is a loopback name (no DNS rebinding). At most
    ``DATA_SERVER_THREADS`` requests at once, each client dropped after
    ``DATA_SERVER_READ_TIMEOUT_S`` of silence. Runs in a background thread.

    Args:
        mounts: URL path prefix (e.g. "neuroglancer/jpeg") -> folder served under it.
        host: address to bind; keep 127.0.0.1 unless you mean to share the data.
        port: port to bind; 0 picks a free one.
        origins: origins answered with CORS (more with :meth:`allow_origin`).
    """

    def __init__(
        self,
        mounts: Mapping[str, Path],
        host: str = "127.0.0.1",
        port: int = 0,
        origins: Iterable[str] = DEFAULT_ORIGINS,
    ) -> None:
        for prefix, folder in mounts.items():
            if not Path(folder).is_dir():
                raise NotFound(f"cannot serve {prefix!r}: {folder} is not a folder")
        self._app = _DataApp(
            mounts, origins, LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else frozenset()
        )
        self._httpd = _BoundedServer(host, port, self._app, handler=_QuietHandler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.1,), name="emprocess-data-server", daemon=True
        )
        self._thread.start()
        self.url = f"http://{host}:{self.port}"
        log.info("serving %s at %s", {k: str(v) for k, v in mounts.items()}, self.url)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def allow_origin(self, origin: str) -> None:
        """Answer CORS for ``origin`` too (e.g. ``http://127.0.0.1:PORT`` of a viewer)."""
        self._app.origins.add(origin.rstrip("/"))

    @property
    def records(self) -> list[RequestRecord]:
        """The requests answered so far (the last 10,000), oldest first."""
        with self._app.records_lock:
            return list(self._app.records)

    def stop(self) -> None:
        """Stop serving and close the socket; repeating it is harmless."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def __enter__(self) -> DataServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
