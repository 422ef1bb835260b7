"""Mock alignment server for test mode: every request gets the same fixed transform.

Answers POST / in the alignment service's JSON shape without reading any
image, so the workflow can be exercised with no images to match. Usage:

    python moc_server.py [--host 127.0.0.1] [--port 8081] [--affine m00 m10 m01 m11 m02 m12]
"""

from __future__ import annotations

import argparse
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("moc_server")


def response(affine: list[float], width: int = 0, height: int = 0) -> dict:
    """A result with the alignment service's keys, the fixed transform as both models."""
    return {
        "width": width,
        "height": height,
        "width0": width,
        "height0": height,
        "affine": affine,
        "translation": [1.0, 0.0, 0.0, 1.0, affine[4], affine[5]],
        "affine_found": True,
        "translation_found": True,
        "affine_inliers": 100,
        "translation_inliers": 100,
        "affine_mean_residual_px": 0.0,
        "affine_max_residual_px": 0.0,
        "translation_mean_residual_px": 0.0,
        "translation_max_residual_px": 0.0,
        "features_pre": 0,
        "features_post": 0,
        "matches": 0,
        "attempts": 0,
        "seconds": 0.0,
    }


def make_handler(affine: list[float]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok", "service": "moc_server"})
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError:
                self._answer(400, {"error": "request body must be JSON"})
                return
            self._answer(200, response(affine))

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug(fmt, *args)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port (default 8081)")
    parser.add_argument(
        "--affine", type=float, nargs=6, default=[1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        metavar="M", help="the transform to answer, mpicbg order (default identity)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(list(args.affine)))
    print(
        f"moc_server answering {args.affine} on http://{args.host}:{server.server_port}", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
