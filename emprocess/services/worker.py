"""gunicorn's sync worker with a deadline on receiving a request (slowloris, issue 20).

A sync worker serves one connection at a time, which keeps one request's memory per
worker (Cloud Run's concurrency 1, and the local runs' memory plan); but it reads the
request in a blocking loop, so a client that sends its headers a byte at a time held it
until gunicorn's 900 s timeout, /health included. Here every read of a connection
shares one deadline, ``RECEIVE_DEADLINE_S`` after it was accepted: a request (headers
and its body of at most 1 MiB) arrives in milliseconds on 127.0.0.1 and on Cloud Run,
whose front end buffers it; a slower one is dropped and the worker serves the next.

Use: ``gunicorn --worker-class emprocess.services.worker.DeadlineSyncWorker ...``
(``emprocess serve`` and both containers do).
"""

from __future__ import annotations

import socket
import time
from typing import Any

from gunicorn.workers.sync import SyncWorker

__all__ = ["RECEIVE_DEADLINE_S", "DeadlineSocket", "DeadlineSyncWorker"]

RECEIVE_DEADLINE_S = 10.0
"""Seconds a client has to send a whole request after its connection was accepted."""


class DeadlineSocket(socket.socket):
    """A connection whose reads all end by ``deadline`` (time.monotonic()); then TimeoutError."""

    deadline: float = 0.0

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"request not received within {RECEIVE_DEADLINE_S:g} s")
        return left

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.settimeout(self._left())
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(self._left())
        return super().recv_into(buffer, nbytes, flags)


def with_deadline(client: socket.socket, seconds: float = RECEIVE_DEADLINE_S) -> DeadlineSocket:
    """The accepted connection ``client`` as a :class:`DeadlineSocket` (same descriptor)."""
    conn = DeadlineSocket(client.family, client.type, client.proto, fileno=client.detach())
    conn.deadline = time.monotonic() + seconds
    return conn


class DeadlineSyncWorker(SyncWorker):
    """gunicorn's sync worker; each connection must send its request within the deadline."""

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        # A late client's TimeoutError is an OSError: SyncWorker.handle logs it and closes.
        super().handle(listener, with_deadline(client), addr)
