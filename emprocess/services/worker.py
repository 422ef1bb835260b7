"""gunicorn's sync worker that runs a request only once it has arrived (slowloris, issue 20).

A sync worker serves one request at a time, which keeps one request's memory per worker
(Cloud Run's concurrency 1, and the local runs' memory plan); but it read each request
in a blocking loop, so a client that sent its headers a byte at a time held it until
gunicorn's 900 s timeout, /health included. This worker first receives requests on
every connection it has accepted, side by side (``select``), and hands one to gunicorn
only when its headers and its ``Content-Length`` body are all there: a slow client
holds no worker, and other requests are served meanwhile. A connection gets
``RECEIVE_DEADLINE_S`` from its accept to send its request (a request arrives in
milliseconds on 127.0.0.1 and on Cloud Run, whose front end buffers it), and at most
``MAX_PENDING`` connections wait at once. Work stays one request at a time.

Use: ``gunicorn --worker-class emprocess.services.worker.DeadlineSyncWorker ...``
(``emprocess serve`` and both containers do).
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from gunicorn.workers.sync import SyncWorker

__all__ = ["MAX_PENDING", "RECEIVE_DEADLINE_S", "DeadlineSocket", "DeadlineSyncWorker"]

RECEIVE_DEADLINE_S = 10.0
"""Seconds a client has to send a whole request after its connection was accepted."""
MAX_PENDING = 16
"""Connections whose requests are being received at once; more wait in the listen queue."""
MAX_BUFFERED = (1 << 20) + 65536
"""Bytes of one request held before it runs (a 1 MiB body and its headers); a larger
one runs at once and is refused by the service (413)."""
_EXPECT = re.compile(rb"\r\nexpect:[ \t]*100-continue[ \t]*\r\n", re.IGNORECASE)
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*\r\n", re.IGNORECASE)


class DeadlineSocket(socket.socket):
    """A connection whose reads first return ``buffered`` bytes, and all end by ``deadline``
    (``time.monotonic()``), then raise TimeoutError."""

    deadline: float = 0.0
    buffered: bytes = b""

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not received within {RECEIVE_DEADLINE_S:g} s")
        return left

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self.buffered and not flags:
            out, self.buffered = self.buffered[:bufsize], self.buffered[bufsize:]
            return out
        self.settimeout(self._left())
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.buffered and not flags:
            data = self.recv(nbytes or len(buffer))
            buffer[: len(data)] = data
            return len(data)
        self.settimeout(self._left())
        return super().recv_into(buffer, nbytes, flags)


def with_deadline(client: socket.socket, seconds: float = RECEIVE_DEADLINE_S) -> DeadlineSocket:
    """The accepted connection ``client`` as a :class:`DeadlineSocket` (same descriptor)."""
    conn = DeadlineSocket(client.family, client.type, client.proto, fileno=client.detach())
    conn.deadline = time.monotonic() + seconds
    return conn


@dataclass
class _Pending:
    conn: DeadlineSocket
    addr: Any
    data: bytearray = field(default_factory=bytearray)

    def receive(self) -> bool | None:
        """Read what arrived: True when the request is whole, None when the client left."""
        try:
            chunk = socket.socket.recv(self.conn, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return None
        if not chunk:
            return None
        self.data += chunk
        return self.complete()

    def complete(self) -> bool:
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            return len(self.data) >= MAX_BUFFERED  # the parser refuses an oversized head
        length = _LENGTH.search(self.data, 0, end + 2)
        body = int(length.group(1)) if length else 0
        if end + 4 + body > MAX_BUFFERED:  # too large to wait for: the service answers 413
            return True
        if _EXPECT.search(self.data, 0, end + 2):  # the client waits for "100 Continue"
            return True
        return len(self.data) - (end + 4) >= body


class DeadlineSyncWorker(SyncWorker):
    """gunicorn's sync worker; it runs each request once received (see the module)."""

    def accept(self, listener: Any) -> None:
        client, addr = listener.accept()  # no connection waiting: OSError, as SyncWorker's
        pending = [self._pending(client, addr)]
        while pending and self.alive:
            self.notify()
            now = time.monotonic()
            for p in [p for p in pending if p.conn.deadline <= now]:
                pending.remove(p)
                p.conn.close()  # too slow: dropped, as gunicorn's timeout would, but sooner
            if not pending:
                return
            wait = min(p.conn.deadline for p in pending) - now
            fds: list[Any] = [p.conn for p in pending]
            if len(pending) < MAX_PENDING:
                fds.append(listener)
            try:
                readable, _, _ = select.select(fds, [], [], max(0.0, min(wait, 1.0)))
            except InterruptedError:
                continue
            if listener in readable:
                with contextlib.suppress(BlockingIOError, InterruptedError, ConnectionAbortedError):
                    pending.append(self._pending(*listener.accept()))
            for p in [p for p in pending if p.conn in readable]:
                state = p.receive()
                if state is None:
                    pending.remove(p)
                    p.conn.close()
                elif state:
                    pending.remove(p)
                    p.conn.setblocking(True)
                    p.conn.buffered = bytes(p.data)
                    self.handle(listener, p.conn, p.addr)  # closes the connection

    def _pending(self, client: socket.socket, addr: Any) -> _Pending:
        conn = with_deadline(client)
        conn.setblocking(False)
        return _Pending(conn, addr)
