"""Stand-in for both services in scale benchmarks: instant answers, no image work.

POST / answers as the alignment service does with an identity transform (the answer of
``moc_server.py``), /features with no features; /alignedslice and /ngshard answer "success" as emwrite does; /ngmeta
also writes the volume's ``info`` (``gs://DEST/neuroglancer/jpeg/info`` through
emprocess.storage), which the DAG's ``iswritten`` checks. Not part of the package: only
``emprocess bench scale`` starts it. Usage:

    python emprocess_bench/standin_services.py --port 8090
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moc_server import response

IDENTITY = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
ALIGN_ANSWER = json.dumps(response(IDENTITY, 64, 64)).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn answers the batch's sessions

    def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, b'{"status": "ok", "service": "standin"}')
        else:
            self._answer(404, b'{"error": "no such route"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except json.JSONDecodeError:
            self._answer(400, b'{"error": "request body must be JSON"}')
            return
        if self.path == "/":
            self._answer(200, ALIGN_ANSWER)
        elif self.path == "/features":  # stores nothing: its pairs answer the identity
            self._answer(200, b'{"count": 0}')
        elif self.path in ("/alignedslice", "/ngshard"):
            self._answer(200, b"success", "text/plain")
        elif self.path == "/ngmeta":
            from emprocess import storage

            info = {"type": "image", "data_type": "uint8", "num_channels": 1, "scales": []}
            url = f"gs://{body['dest']}/neuroglancer/jpeg/info"
            storage.write_bytes(url, json.dumps(info).encode(), "application/json")
            self._answer(200, b"success", "text/plain")
        else:
            self._answer(404, b'{"error": "no such route"}')

    def log_message(self, fmt: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 resets connections when a batch task's 16
    # threads connect at once; each reset cost a retry after 1-2 s of backoff.
    request_queue_size = 1024
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    Server((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
