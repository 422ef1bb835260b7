"""Helpers of the workflow tests: a tiny scriptable HTTP server, slice fixtures, and the
end-to-end runs of the DAGs (``dag.test()``) with what to measure on their output.

``ScriptedServer`` is a real HTTP server on 127.0.0.1 (``http.server`` in a thread).
Each request is recorded and answered by a ``respond`` callable, which lets a test
make a service flaky (503s, a slow answer that times out) or refuse a request (400),
without mocking the client.

The end-to-end runs use a 12-slice synthetic stack with known drift
(:func:`emprocess.sample.write_sample`); :func:`alignment_errors_px` compares a run's
transforms.json with the stack's truth, :func:`read_volume` reads the JPEG pyramid back.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from faultproxy import FaultProxy, Recorded, Rule, fail_first

from emprocess import affine, storage
from emprocess import layout as layout_
from emprocess.layout import RunLayout
from emprocess.sample import write_sample
from emprocess.workflow.conf import parse_conf


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
            f"gs://{req.body['dest']}/{layout_.JPEG_PATH}/info", json.dumps(info).encode()
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


# -- end-to-end runs -------------------------------------------------------------------

E2E_SLICES = 12
E2E_SIZE_XY = (384, 320)
E2E_SEED = 6
"""The e2e stack: 12 slices of 384 x 320 px. With this seed the pairwise alignment at
downsample_factor 1 composes to ~0.4 px of the truth; other seeds give 0.2-1.2 px, mostly
from CONTRACTS.md's rule that takes the translation model when |m01| <= 0.0008."""

E2E_HTTP_ENV = {
    "EMPROCESS_HTTP_ATTEMPTS": "6",
    "EMPROCESS_HTTP_BACKOFF_S": "0.05",
    "EMPROCESS_HTTP_MAX_BACKOFF_S": "0.2",
}
"""Fast retries for the e2e runs (the defaults wait seconds to minutes)."""


def write_e2e_stack(bucket: str) -> dict[str, Any]:
    """Write the e2e stack to ``gs://BUCKET/stack/``; returns its truth.json."""
    return write_sample(f"gs://{bucket}/stack", E2E_SLICES, *E2E_SIZE_XY, seed=E2E_SEED)


def e2e_conf(run_id: str, source: str, truth: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The conf of an e2e run of the stack: downsample_factor 1, raw pyramid, 8 nm."""
    return {
        "id": run_id,
        "image": "stack/" + truth["image"],
        "minz": truth["minz"],
        "maxz": truth["maxz"],
        "source": source,
        "downsample_factor": 1,
        "resolution": 8,
        # These runs check the original chain byte for byte (issue 11's compatibility
        # mode); tests/test_global_align_e2e.py runs the neighbours and the solve.
        "neighbors": 1,
        "global_solve": False,
        **extra,
    }


@dataclass
class E2ERun:
    """What one ``dag.test()`` run did: its state per task and what the services were sent."""

    source: str
    run_id: str
    backend: str
    root: Path | None
    dag_id: str
    conf: dict[str, Any]
    truth: dict[str, Any]
    state: str
    task_states: dict[str, str]  # "task_id" or "task_id[map_index]" -> state
    tries: dict[str, int]  # same keys -> try number of the last try
    align_requests: list[Recorded]
    emwrite_requests: list[Recorded]
    smtp_messages: list[dict[str, Any]]
    elapsed_s: float

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.source, self.run_id)

    @property
    def process(self) -> str:
        return self.layout.process_url()

    @property
    def ng_bucket(self) -> str:
        return self.layout.ng

    @property
    def chunk_bucket(self) -> str:
        return self.layout.chunk

    def paths(self, service: str = "emwrite") -> list[str]:
        reqs = self.emwrite_requests if service == "emwrite" else self.align_requests
        return [r.path for r in reqs]

    def bodies(self, path: str) -> list[dict[str, Any]]:
        """JSON bodies of the requests to ``path`` (``/`` for alignment), in arrival order."""
        reqs = (
            self.align_requests
            if path in ("/", "/features", "/histogram")
            else self.emwrite_requests
        )
        return [json.loads(r.body) for r in reqs if r.path == path]


def run_on_local(
    mp: pytest.MonkeyPatch, dag: Any, conf: dict[str, Any], pool: Any, root: Path
) -> E2ERun:
    """:func:`run_e2e` of ``conf`` without a truth, on the local backend under ``root``,
    through the session's services (``pool``: conftest's ServicePool)."""
    return run_e2e(
        mp,
        dag,
        conf,
        {},
        pool.url("align", "local"),
        pool.url("emwrite", "local"),
        backend="local",
        root=root,
    )


def run_e2e(
    mp: pytest.MonkeyPatch,
    dag: Any,
    conf: dict[str, Any],
    truth: dict[str, Any],
    align_url: str,
    emwrite_url: str,
    *,
    backend: str,
    root: Path | None = None,
    align_rules: Iterable[Rule] = (),
    emwrite_rules: Iterable[Rule] = (),
    smtp: bool = False,
    env: Mapping[str, str] | None = None,
) -> E2ERun:
    """``dag.test()`` of ``dag`` with ``conf``, the services reached through recording proxies.

    Args:
        mp: where the Airflow connections and HTTP settings are set (undone by its owner).
        align_url, emwrite_url: the real services (``service_pool``).
        align_rules, emwrite_rules: faults the proxies inject (see tests/faultproxy.py).
        smtp: also give Airflow an SMTP connection to a local sink.
        env: more environment (beyond :data:`E2E_HTTP_ENV`).
    """
    for key, value in {**E2E_HTTP_ENV, **(env or {})}.items():
        mp.setenv(key, value)
    with ExitStack() as stack:
        align_proxy = stack.enter_context(FaultProxy(align_url, rules=list(align_rules)))
        emwrite_proxy = stack.enter_context(FaultProxy(emwrite_url, rules=list(emwrite_rules)))
        mp.setenv("AIRFLOW_CONN_ALIGN_CLOUD_RUN", align_proxy.url)
        mp.setenv("AIRFLOW_CONN_IMG_WRITE", emwrite_proxy.url)
        sink = stack.enter_context(SmtpSink()) if smtp else None
        if sink is not None:
            mp.setenv(
                "AIRFLOW_CONN_SMTP_DEFAULT",
                f"smtp://127.0.0.1:{sink.port}?disable_ssl=true&disable_tls=true"
                "&from_email=emprocess%40example.org&retry_limit=0&timeout=10",
            )
        else:
            mp.delenv("AIRFLOW_CONN_SMTP_DEFAULT", raising=False)
        t0 = time.monotonic()
        run = dag.test(run_conf=conf)
        elapsed = time.monotonic() - t0
    tis = run.get_task_instances()

    def key(ti: Any) -> str:
        return ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"

    return E2ERun(
        source=conf["source"],
        run_id=conf["id"],
        backend=backend,
        root=root,
        dag_id=dag.dag_id,
        conf=conf,
        truth=truth,
        state=str(run.state),
        task_states={key(ti): str(ti.state) for ti in tis},
        tries={key(ti): int(ti.try_number) for ti in tis},
        align_requests=list(align_proxy.requests),
        emwrite_requests=list(emwrite_proxy.requests),
        smtp_messages=list(sink.messages) if sink is not None else [],
        elapsed_s=round(elapsed, 1),
    )


def run_width1_e2e(
    mp: pytest.MonkeyPatch,
    dag_bag: Any,
    align_url: str,
    emwrite_url: str,
    source: str,
    root: Path,
) -> E2ERun:
    """The session's width-1 run on the local backend (``EMPROCESS_STORAGE_ROOT`` set by the
    caller): each service answers its first request (of / for the alignment service, of
    /alignedslice for emwrite) with a 503, and the conf's email goes to an SMTP sink."""
    from emprocess.workflow import dag_id

    storage.create_bucket(source)
    truth = write_e2e_stack(source)
    conf = e2e_conf("e2e1", source, truth, email="someone@example.org")
    return run_e2e(
        mp,
        dag_bag.dags[dag_id(1)],
        conf,
        truth,
        align_url,
        emwrite_url,
        backend="local",
        root=root,
        align_rules=[fail_first(1, 503, lambda r: r.path == "/")],
        emwrite_rules=[fail_first(1, 503, lambda r: r.path == "/alignedslice")],
        smtp=True,
    )


def alignment_errors_px(
    transforms: Mapping[str, Sequence[float]], truth: Mapping[str, Any]
) -> dict[int, float]:
    """Per slice, how far a run's global transform is from the truth, in canvas pixels.

    With G_z the run's transforms (slice px -> canvas px) and A_z the truth (slice px ->
    world px), a perfect alignment makes G_z A_z^-1 one map for every z. The error of z is
    the mean corner distance between G_z and (G_minz A_minz^-1) A_z (0 at minz).
    """
    width, height = int(truth["width"]), int(truth["height"])
    world = {int(z): a for z, a in truth["world"].items()}
    found = {int(z): t for z, t in transforms.items()}
    assert sorted(found) == sorted(world)
    minz = int(truth["minz"])
    canvas_from_world = affine.compose(found[minz], affine.invert(world[minz]))
    return {
        z: affine.mean_corner_error(
            found[z], affine.compose(canvas_from_world, world[z]), width, height
        )
        for z in sorted(found)
    }


def read_volume(url: str, scale_index: int = 0) -> np.ndarray:
    """One scale of a neuroglancer precomputed volume, read with tensorstore, as (z, y, x)."""
    import tensorstore as ts

    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": storage.kvstore_spec(url),
        "scale_index": scale_index,
    }
    store = ts.open(spec, open=True).result()
    data = store.read().result()  # (x, y, z, channel)
    return np.ascontiguousarray(np.transpose(data[..., 0], (2, 1, 0)))


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized cross-correlation of two same-shaped images (1: equal up to gain/offset)."""
    x = a.astype(np.float64) - a.mean()
    y = b.astype(np.float64) - b.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def centre_box(size_xy: Sequence[int], box_xy: Sequence[int]) -> tuple[slice, slice]:
    """(rows, columns) of a ``box_xy`` window in the centre of an image of ``size_xy``."""
    x0 = (int(size_xy[0]) - int(box_xy[0])) // 2
    y0 = (int(size_xy[1]) - int(box_xy[1])) // 2
    return slice(y0, y0 + int(box_xy[1])), slice(x0, x0 + int(box_xy[0]))


def consecutive_ncc(
    slices: Sequence[np.ndarray], size_xy: Sequence[int], box_xy: Sequence[int]
) -> list[float]:
    """NCC of the centre windows of slices z and z + 1, for every z."""
    rows, cols = centre_box(size_xy, box_xy)
    return [ncc(a[rows, cols], b[rows, cols]) for a, b in pairwise(slices)]


def read_slices(source: str, truth: Mapping[str, Any]) -> list[np.ndarray]:
    """The stack's input slices (gs://SOURCE/stack/...), as (y, x) uint8."""
    out = []
    for z in range(int(truth["minz"]), int(truth["maxz"]) + 1):
        data = storage.read_bytes(f"gs://{source}/stack/" + truth["image"] % z)
        out.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED))
    return out


def bucket_bytes(
    url_prefix: str, skip: Callable[[str], bool] = lambda key: False
) -> dict[str, bytes]:
    """Every object under ``url_prefix`` (key relative to it) with its bytes."""
    loc = storage.parse_url(url_prefix.rstrip("/") + "/", allow_empty_key=True)
    out = {}
    for key in storage.list_keys(url_prefix.rstrip("/") + "/"):
        rel = key[len(loc.key) :]
        if not skip(rel):
            out[rel] = storage.read_bytes(storage.bucket_url(loc.bucket, key))
    return out


@dataclass
class RunFigures:
    """What a finished e2e run measured: alignment error and slice-to-slice NCC."""

    max_error_px: float
    errors_px: dict[int, float]
    ncc_aligned: list[float]
    ncc_raw: list[float]
    bbox_xy: tuple[int, int]

    def line(self, run: E2ERun) -> str:
        return (
            f"{run.dag_id} on {run.backend}: max alignment error {self.max_error_px:.3f} px; "
            f"NCC of consecutive slices aligned min {min(self.ncc_aligned):.3f} "
            f"mean {np.mean(self.ncc_aligned):.3f}, raw mean {np.mean(self.ncc_raw):.3f} "
            f"max {max(self.ncc_raw):.3f}; canvas {self.bbox_xy}; dag.test {run.elapsed_s} s"
        )


NCC_BOX_XY = (E2E_SIZE_XY[0] // 2, E2E_SIZE_XY[1] // 2)
"""The centre window the NCC is measured in: inside every slice, whatever the drift."""


SOLVE_MAX_ERROR_PX = 1.5
"""How far a run with the global solve may be from the synthetic truth: issue 11's bound.

The synthetic stacks drift in scale and shear too (up to 0.3% a slice), which the solve,
regularized toward rigid, deliberately does not follow (real FIB-SEM does not scale);
the chain follows it and stays within 1 px."""


def check_finished_run(run: E2ERun) -> RunFigures:
    """The checks every successful e2e run passes; returns its figures.

    Every task succeeded; init.json, transforms.json/.csv, qc.csv, canvas.json and
    complete.json exist and no failure record is left; the transforms are within 1 px of
    the truth (``SOLVE_MAX_ERROR_PX`` with the global solve); the JPEG volume read back
    has the canvas size and its consecutive slices correlate (NCC > 0.8 in the centre)
    far better than the raw input slices do.
    """
    assert run.state == "success", run.task_states
    assert set(run.task_states.values()) == {"success"}, run.task_states
    layout = run.layout
    for name in (layout_.INIT, layout_.COMPLETE, *RUN_ALIGN_RECORDS):
        assert storage.exists(layout.process_url(name)), name
    assert storage.list_keys(layout.process_url(layout_.FAILURES) + "/") == []
    complete = json.loads(storage.read_bytes(layout.process_url(layout_.COMPLETE)))
    canvas = json.loads(storage.read_bytes(layout.process_url(layout_.CANVAS)))
    assert complete["bbox"] == canvas["bbox"]
    assert complete["neuroglancer"] == f"precomputed://{layout.jpeg_url}"

    transforms = json.loads(storage.read_bytes(layout.process_url(layout_.TRANSFORMS)))
    errors = alignment_errors_px(transforms, run.truth)
    solved = parse_conf(run.conf).global_solve
    assert max(errors.values()) < (SOLVE_MAX_ERROR_PX if solved else 1.0), errors

    bbox = (int(canvas["bbox"][0]), int(canvas["bbox"][1]))
    volume = read_volume(layout.jpeg_url)
    assert volume.shape == (E2E_SLICES, bbox[1], bbox[0])
    aligned = consecutive_ncc(list(volume), bbox, NCC_BOX_XY)
    raw = consecutive_ncc(read_slices(run.source, run.truth), E2E_SIZE_XY, NCC_BOX_XY)
    assert min(aligned) > 0.8, aligned
    assert min(aligned) > max(raw) + 0.3, (aligned, raw)
    return RunFigures(max(errors.values()), errors, aligned, raw, bbox)


RUN_ALIGN_RECORDS = (layout_.TRANSFORMS, layout_.TRANSFORMS_CSV, layout_.QC, layout_.CANVAS)
