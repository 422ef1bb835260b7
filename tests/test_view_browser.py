"""Viewing: the local data server, neuroglancer links, and a real headless-Chromium view."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import point_storage
from volumes import BuiltVolume, build_test_volume

from emprocess.errors import InvalidInput, NotFound
from emprocess.layout import JPEG_PATH
from emprocess.view import (
    NEUROGLANCER_APP,
    Access,
    DataServer,
    ViewSession,
    VolumeGeometry,
    check_public_read,
    gcs_view,
    geometry_from_info,
    neuroglancer_link,
    neuroglancer_source,
    serve_run,
    viewer_state,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = (
    "the browser test needs Debian's chromium and chromium-driver "
    f"({CHROMIUM}, {CHROMEDRIVER}); install them with: "
    "`make browser` (part of `make test`), i.e. as root: "
    "apt-get update && apt-get install -y chromium chromium-driver"
)
CHROMIUM_FLAGS = [  # CONTRACTS.md "Viewing": WebGL through the software renderer
    "--headless=new",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1000,800",
]
LOAD_TIMEOUT_S = 40.0
# What "the viewer shows the EM data" means. The 256^2 x 64 test volume, loaded,
# measures 0.22, 0.96 and 0.97; the same viewer with the shard files removed (outlines,
# crosshairs and black sections, no data) measures 0.008, 0.0 and 0.01.
MIN_DATA_FRACTION = 0.15  # data pixels (data_pixel_mask) / viewer pixels below the top bars
MIN_XY_DATA_FRACTION = 0.80  # the same inside the xy panel's volume outline
MIN_XY_CORRELATION = 0.80  # xy panel vs the volume's slice at the viewer's z
TOP_BARS_PX = 48  # neuroglancer's position bar and layer bar
UI_GREYS = (0, 34, 128)  # black, the bars' dark grey and the panel grey: never data


# -- the data server -------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[DataServer, bytes, Path]]:
    """A DataServer for tmp/vol (mounted at neuroglancer/jpeg), with files next to it."""
    folder = tmp_path / "vol"
    (folder / "8_8_8").mkdir(parents=True)
    payload = bytes(range(256)) * 4
    (folder / "8_8_8" / "0.shard").write_bytes(payload)
    (folder / "info").write_text('{"scales": []}')
    (tmp_path / "secret.txt").write_text("outside the served folder")
    (folder / "escape").symlink_to(tmp_path / "secret.txt")
    server = DataServer({"neuroglancer/jpeg": folder})
    try:
        yield server, payload, tmp_path
    finally:
        server.stop()


def _request(
    server: DataServer, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send one request with the path exactly as given (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers={"Origin": NG_ORIGIN, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


SHARD = "/neuroglancer/jpeg/8_8_8/0.shard"
NG_ORIGIN = NEUROGLANCER_APP.rstrip("/")  # an origin the data server answers CORS for


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [("bytes=0-15", 0, 15), ("bytes=1000-", 1000, 1023), ("bytes=-10", 1014, 1023)],
)
def test_range_answers_206_with_those_bytes(
    served: tuple[DataServer, bytes, Path], header: str, first: int, last: int
) -> None:
    server, payload, _ = served
    status, headers, body = _request(server, "GET", SHARD, {"Range": header})
    assert status == 206
    assert body == payload[first : last + 1]
    assert headers["content-range"] == f"bytes {first}-{last}/{len(payload)}"
    assert headers["content-length"] == str(last - first + 1)
    assert headers["accept-ranges"] == "bytes"
    assert headers["access-control-allow-origin"] == NG_ORIGIN
    assert "Content-Range" in headers["access-control-expose-headers"]
    assert server.records[-1].range == header and server.records[-1].status == 206


def test_no_range_answers_200_with_the_whole_file(served: tuple[DataServer, bytes, Path]) -> None:
    server, payload, _ = served
    status, headers, body = _request(server, "GET", SHARD)
    assert (status, body) == (200, payload)
    assert headers["accept-ranges"] == "bytes"
    assert headers["access-control-allow-origin"] == NG_ORIGIN
    status, headers, body = _request(server, "GET", "/neuroglancer/jpeg/info?x=1")
    assert (status, body, headers["content-type"]) == (200, b'{"scales": []}', "application/json")


def test_head_and_unsatisfiable_range(served: tuple[DataServer, bytes, Path]) -> None:
    server, payload, _ = served
    status, headers, body = _request(server, "HEAD", SHARD)
    assert (status, body, headers["content-length"]) == (200, b"", str(len(payload)))
    status, headers, _ = _request(server, "GET", SHARD, {"Range": "bytes=5000-"})
    assert status == 416
    assert headers["content-range"] == f"bytes */{len(payload)}"
    assert headers["access-control-allow-origin"] == NG_ORIGIN


def test_a_raw_nul_in_the_path_is_a_bad_request(served: tuple[DataServer, bytes, Path]) -> None:
    import socket

    server, _, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /neuroglancer/jpeg/in\x00fo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.0 400") or reply.startswith(b"HTTP/1.1 400"), reply[:80]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/neuroglancer/jpeg/../../secret.txt", 403),
        ("/neuroglancer/jpeg/%2e%2e/%2e%2e/secret.txt", 403),
        ("/neuroglancer/jpeg/escape", 403),  # a symlink out of the folder
        ("/secret.txt", 404),  # under no mount
        ("/neuroglancer/jpeg/8_8_8/1.shard", 404),
        ("/neuroglancer/jpeg/8_8_8", 404),  # folders are not listed
        ("/neuroglancer/jpeg/info%00.png", 400),  # an embedded NUL names no file
    ],
)
def test_refuses_paths_outside_and_missing_files(
    served: tuple[DataServer, bytes, Path], path: str, status: int
) -> None:
    server, _, _ = served
    got, headers, body = _request(server, "GET", path)
    assert got == status
    assert b"outside the served folder" not in body
    assert headers["access-control-allow-origin"] == NG_ORIGIN


def test_options_preflight(served: tuple[DataServer, bytes, Path]) -> None:
    server, _, _ = served
    status, headers, body = _request(
        server,
        "OPTIONS",
        SHARD,
        {
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "range",
        },
    )
    assert (status, body) == (204, b"")
    assert headers["access-control-allow-origin"] == NG_ORIGIN
    assert "Range" in headers["access-control-allow-headers"]
    assert "GET" in headers["access-control-allow-methods"]


def test_stop_closes_the_port(tmp_path: Path) -> None:
    server = DataServer({"a": tmp_path})
    port = server.port
    server.stop()
    server.stop()  # harmless
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_data_server_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="not a folder"):
        DataServer({"neuroglancer/jpeg": tmp_path / "nope"})


@pytest.mark.parametrize(
    ("header", "status", "first", "last"),
    [
        ("bytes=0-0", 206, 0, 0),
        ("bytes=10-2000", 206, 10, 1023),  # clipped to the file
        ("bytes=-24", 206, 1000, 1023),
        ("bytes=0-1,5-6", 416, 0, 0),  # several ranges: not served (werkzeug)
        ("bytes=5-2", 416, 0, 0),  # malformed
        ("bytes=-0", 416, 0, 0),
    ],
)
def test_range_edge_cases(
    served: tuple[DataServer, bytes, Path], header: str, status: int, first: int, last: int
) -> None:
    server, payload, _ = served
    got, headers, body = _request(server, "GET", SHARD, {"Range": header})
    assert got == status
    if status == 206:
        assert body == payload[first : last + 1]
    else:
        assert headers["content-range"] == f"bytes */{len(payload)}"
    assert headers["access-control-allow-origin"] == NG_ORIGIN


def test_etag_revalidation_answers_304_and_a_changed_file_200(
    served: tuple[DataServer, bytes, Path],
) -> None:
    """The browser's If-None-Match gets 304 without a body, until the file changes."""
    server, payload, tmp_path = served
    status, headers, _ = _request(server, "GET", SHARD)
    etag = headers["etag"]
    assert status == 200 and "ETag" in headers["access-control-expose-headers"]
    status, headers, body = _request(server, "GET", SHARD, {"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert headers["access-control-allow-origin"] == NG_ORIGIN
    shard = tmp_path / "vol" / "8_8_8" / "0.shard"
    shard.write_bytes(payload[::-1])
    os.utime(shard, (time.time() + 5, time.time() + 5))  # a new mtime even on coarse clocks
    status, _, body = _request(server, "GET", SHARD, {"If-None-Match": etag})
    assert (status, body) == (200, payload[::-1])
    status, _, body = _request(server, "GET", SHARD, {"Range": "bytes=0-3", "If-Range": etag})
    assert (status, body) == (200, payload[::-1])  # stale If-Range: the whole new file


# -- links and the public-read check ----------------------------------------------------


def test_neuroglancer_source() -> None:
    assert neuroglancer_source("my-em", "run_7") == (
        "precomputed://gs://my-em_ng_run_7/neuroglancer/jpeg"
    )
    assert neuroglancer_source("my-em", "run_7", raw=True) == (
        "precomputed://gs://my-em_chunk_run_7/neuroglancer/raw"
    )


def test_link_carries_the_state_in_nm_at_the_volume_resolution() -> None:
    import neuroglancer

    geometry = VolumeGeometry((8.0, 8.0, 8.0), (1000, 600, 51), (0, 0, 100))
    source = neuroglancer_source("my-em", "run_7")
    link = neuroglancer_link(viewer_state([("run_7", source)], geometry))
    assert link.startswith("https://neuroglancer-demo.appspot.com/#!%7B")
    state = neuroglancer.parse_url(link)  # neuroglancer's own parser reads it back
    dims = state.dimensions
    assert list(dims.names) == ["x", "y", "z"]
    assert list(dims.units) == ["m", "m", "m"]
    assert list(dims.scales) == [8e-9, 8e-9, 8e-9]
    assert list(state.position) == [500.0, 300.0, 125.5]
    assert state.layers["run_7"].source[0].url == source
    assert state.layers["run_7"].type == "image"


def test_state_without_geometry_and_info_errors() -> None:
    state = viewer_state([("a", "precomputed://gs://b/c")], None, layout="xy")
    assert state["dimensions"]["x"] == [8e-9, "m"] and "position" not in state
    with pytest.raises(InvalidInput, match="at least one layer"):
        viewer_state([], None)
    with pytest.raises(InvalidInput, match="no usable scale 0"):
        geometry_from_info({"scales": []})
    with pytest.raises(InvalidInput, match="resolution must be > 0"):
        geometry_from_info({"scales": [{"resolution": [0, 8, 8], "size": [1, 1, 1]}]})


class _StubGCS(BaseHTTPRequestHandler):
    """Answers /STATUS/...: that status; /200nocors/...: 200 without CORS headers."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        first = self.path.split("/")[1]
        status = 200 if first == "200nocors" else int(first)
        body = b'{"scales": []}'
        self.send_response(status)
        if first == "200":
            self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def stub_gcs() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StubGCS)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("bucket", "access", "cors"),
    [
        ("200", Access.PUBLIC, True),
        ("200nocors", Access.PUBLIC, False),
        ("401", Access.PRIVATE, None),
        ("403", Access.PRIVATE, None),
        ("404", Access.MISSING, None),
        ("500", Access.UNKNOWN, None),
    ],
)
def test_public_read_check_answers(stub_gcs: str, bucket: str, access: Access, cors: bool) -> None:
    check = check_public_read(bucket, timeout_s=5, base_url=stub_gcs)
    assert check.url == f"{stub_gcs}/{bucket}/neuroglancer/jpeg/info"
    assert (check.access, check.cors) == (access, cors)


def test_public_read_check_could_not_check_when_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    check = check_public_read("b", timeout_s=2, base_url=f"http://127.0.0.1:{closed}")
    assert check.access is Access.UNKNOWN
    assert str(check.access) == "could not check"
    with socket.socket() as silent:  # accepts the connection, never answers: the timeout
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        check = check_public_read(
            "b", timeout_s=0.5, base_url=f"http://127.0.0.1:{silent.getsockname()[1]}"
        )
    assert check.access is Access.UNKNOWN and "timed out" in check.detail
    assert time.monotonic() - t0 < 5


# -- a real volume -------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltRun:
    root: Path
    volume: BuiltVolume


@pytest.fixture(scope="module")
def built_run(tmp_path_factory: pytest.TempPathFactory) -> BuiltRun:
    """A 256 x 256 x 64 run at 8 nm written by the emwrite functions (a few seconds)."""
    root = tmp_path_factory.mktemp("view-storage")
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(root))
        volume = build_test_volume("viewsrc", "run1", 64, 256, 256, write_raw=True)
    return BuiltRun(root, volume)


@pytest.fixture
def local_run(built_run: BuiltRun, monkeypatch: pytest.MonkeyPatch) -> BuiltVolume:
    point_storage(monkeypatch, str(built_run.root))
    return built_run.volume


def test_gcs_view_link_and_could_not_check(local_run: BuiltVolume) -> None:
    """The gs:// path, with the info read through storage and the check unreachable."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = gcs_view(local_run.source, local_run.run_id, timeout_s=2, gcs_url=closed)
    assert [c.access for c in result.checks] == [Access.UNKNOWN]
    assert result.geometry == VolumeGeometry((8.0, 8.0, 8.0), (256, 256, 64), (0, 0, 0))
    assert any("could not check" in w for w in result.warnings())
    state = json.loads(urllib.parse.unquote(result.link.split("#!", 1)[1]))
    assert state["layers"][0]["source"] == neuroglancer_source("viewsrc", "run1")
    assert state["position"] == [128.0, 128.0, 32.0]


def test_gcs_view_of_a_public_bucket(built_run: BuiltRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DataServer plays public GCS (bucket/key paths, CORS); no storage root, no cloud."""
    point_storage(monkeypatch, None)
    volume = built_run.volume
    mounts = {f"{volume.ng_bucket}/{JPEG_PATH}": built_run.root / volume.ng_bucket / JPEG_PATH}
    with DataServer(mounts) as fake_gcs:
        result = gcs_view(volume.source, volume.run_id, raw=True, gcs_url=fake_gcs.url)
    assert [(c.access, c.cors) for c in result.checks] == [
        (Access.PUBLIC, True),
        (Access.MISSING, None),  # the raw volume's bucket is not served here
    ]
    assert result.geometry == VolumeGeometry((8.0, 8.0, 8.0), (256, 256, 64), (0, 0, 0))
    assert len(result.warnings()) == 1 and "does not exist" in result.warnings()[0]
    state = json.loads(urllib.parse.unquote(result.link.split("#!", 1)[1]))
    assert [layer["source"] for layer in state["layers"]] == [
        neuroglancer_source("viewsrc", "run1"),
        neuroglancer_source("viewsrc", "run1", raw=True),
    ]


def test_gcs_view_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    point_storage(monkeypatch, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = gcs_view("my-em", "run_7", timeout_s=2, gcs_url=closed)
    assert result.geometry is None
    warnings = result.warnings()
    assert "could not check" in warnings[0] and "assumes 8.0 nm" in warnings[1]
    assert result.link.startswith("https://neuroglancer-demo.appspot.com/#!")


def test_serve_run_errors(local_run: BuiltVolume, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFound, match="no volume at"):
        serve_run("viewsrc", "no-such-run")
    point_storage(monkeypatch, None)
    with pytest.raises(InvalidInput, match="EMPROCESS_STORAGE_ROOT"):
        serve_run("viewsrc", "run1")


def test_serve_run_with_raw(local_run: BuiltVolume, caplog: pytest.LogCaptureFixture) -> None:
    with serve_run(local_run.source, local_run.run_id, raw=True) as session:
        assert "complete.json is missing" in caplog.text  # the test run has no status
        names = [layer.name for layer in session.viewer.state.layers]
        assert names == ["run1", "run1-raw"]
        status, _, body = _request(session.data_server, "GET", "/neuroglancer/raw/info")
        assert status == 200 and json.loads(body)["scales"][0]["encoding"] == "raw"
        assert list(session.viewer.state.dimensions.scales) == [8e-9] * 3
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", session.data_server.port)):
        pass


# -- the browser ---------------------------------------------------------------------------


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium driven by selenium; FAILS (never skips) when it is not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: {INSTALL_HINT}", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def view_session(local_run: BuiltVolume) -> Iterator[ViewSession]:
    session = serve_run(local_run.source, local_run.run_id)
    try:
        yield session
    finally:
        session.stop()


@dataclass(frozen=True)
class ScreenMetrics:
    data_fraction: float  # textured grey pixels / viewer pixels below the top bars
    xy_data_fraction: float  # the same inside the xy panel's volume outline
    xy_correlation: float  # Pearson r of that outline's content with the true slice

    def ok(self) -> bool:
        return (
            self.data_fraction >= MIN_DATA_FRACTION
            and self.xy_data_fraction >= MIN_XY_DATA_FRACTION
            and self.xy_correlation >= MIN_XY_CORRELATION
        )


def data_pixel_mask(bgr: np.ndarray) -> np.ndarray:
    """Pixels that show image data: grey (EM is drawn grey) and textured.

    Neuroglancer's UI is flat colours (``UI_GREYS``: panel grey 128, black, dark
    bars): those values are dropped, and a 5x5 standard deviation of at least 6
    grey levels keeps the EM texture and drops the rest of the UI except for the
    anti-aliased rims of text and outlines.
    """
    b, g, r = (bgr[..., i].astype(np.int16) for i in range(3))
    grey = (np.abs(r - g) <= 2) & (np.abs(g - b) <= 2)
    background = np.isin(g, UI_GREYS)
    lum = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    mean = cv2.blur(lum, (5, 5))
    std = np.sqrt(np.maximum(cv2.blur(lum * lum, (5, 5)) - mean * mean, 0))
    return grey & ~background & (std >= 6)


def measure_screenshot(png: bytes, slice_yx: np.ndarray) -> ScreenMetrics:
    """How much of a 4-panel screenshot shows data, and whether the xy panel is the slice.

    The xy panel is the top-left quarter; neuroglancer outlines the volume there in
    yellow. Its content is compared with ``slice_yx`` (the volume at the viewer's z).
    """
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("the screenshot is not a decodable PNG")
    mask = data_pixel_mask(bgr)
    h, w = mask.shape
    data_fraction = float(mask[TOP_BARS_PX:].mean())
    quarter = bgr[: h // 2, : w // 2]
    yellow = (quarter[..., 0] < 80) & (quarter[..., 1] > 180) & (quarter[..., 2] > 180)
    ys, xs = np.nonzero(yellow)
    if len(ys) < 100 or ys.max() - ys.min() < 20 or xs.max() - xs.min() < 20:
        return ScreenMetrics(data_fraction, 0.0, 0.0)
    y0, y1, x0, x1 = ys.min() + 2, ys.max() - 1, xs.min() + 2, xs.max() - 1
    xy_fraction = float(mask[y0:y1, x0:x1].mean())
    panel = cv2.cvtColor(quarter[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY).astype(np.float64)
    truth = cv2.resize(slice_yx, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    r = np.corrcoef(panel.ravel(), truth.astype(np.float64).ravel())[0, 1]
    return ScreenMetrics(data_fraction, xy_fraction, float(np.nan_to_num(r)))


def read_slice_yx(root: Path, volume: BuiltVolume, z: int) -> np.ndarray:
    """Slice z of the run's JPEG volume at scale 0, as (y, x) uint8 (what the viewer draws)."""
    import tensorstore as ts

    path = root / volume.ng_bucket / "neuroglancer" / "jpeg"
    store = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": f"file://{path}/", "scale_index": 0}
    ).result()
    return np.asarray(store[:, :, z, 0].read().result()).T


@pytest.mark.slow
def test_browser_shows_the_em_data(
    chromium: Any, view_session: ViewSession, built_run: BuiltRun, tmp_path: Path
) -> None:
    """Open the viewer URL of serve_run in headless Chromium and see the volume's slice."""
    position = view_session.viewer.state.position
    z = int(position[2])  # the xy panel shows the voxel layer containing position z
    truth = read_slice_yx(built_run.root, built_run.volume, z)
    t0 = time.monotonic()
    chromium.get(view_session.url)
    deadline = t0 + LOAD_TIMEOUT_S
    while True:
        png = chromium.get_screenshot_as_png()
        metrics = measure_screenshot(png, truth)
        if metrics.ok() or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    print(f"viewer metrics after {time.monotonic() - t0:.1f} s: {metrics}")
    shot = tmp_path / "viewer.png"
    shot.write_bytes(png)
    records = view_session.data_server.records
    shard_ranges = [r for r in records if r.path.endswith(".shard") and r.range and r.status == 206]
    context = (
        f"{metrics}; screenshot {shot}; data requests: "
        f"{[(r.method, r.path, r.range, r.status) for r in records[:20]]}; browser log: "
        f"{[e.get('message') for e in chromium.get_log('browser')][-10:]}"
    )
    assert shard_ranges, f"the viewer made no Range requests for .shard files: {context}"
    assert any(r.path.endswith("/info") and r.status == 200 for r in records), context
    assert metrics.data_fraction >= MIN_DATA_FRACTION, f"too little data on screen: {context}"
    assert metrics.xy_data_fraction >= MIN_XY_DATA_FRACTION, f"xy panel not filled: {context}"
    assert metrics.xy_correlation >= MIN_XY_CORRELATION, f"xy panel is not slice {z}: {context}"


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory: pytest.TempPathFactory) -> BuiltRun:
    """A 192 x 128 x 8 RGB run of three bands (red, green, blue), one JPEG volume each."""
    root = tmp_path_factory.mktemp("view-colour")
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(root))
        volume = build_test_volume("viewrgb", "rgb", 8, 192, 128, colour_bands=True)
    return BuiltRun(root, volume)


MIN_BAND = 0.01  # a band measured 0.013 of the screen; nothing loaded: 0


def colour_fractions(bgr: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per colour: (fraction of pixels that are that saturated colour, their mean x / width)."""
    b, g, r = (bgr[..., i].astype(np.int16) for i in range(3))
    masks = {
        "red": (r > 120) & (g < 40) & (b < 40),
        "green": (g > 120) & (r < 40) & (b < 40),
        "blue": (b > 120) & (r < 40) & (g < 40),
    }
    out = {}
    for name, mask in masks.items():
        xs = np.nonzero(mask)[1]
        out[name] = (float(mask.mean()), float(xs.mean() / mask.shape[1]) if len(xs) else -1.0)
    return out


@pytest.mark.slow
def test_browser_shows_each_channel_in_its_colour(
    chromium: Any, colour_run: BuiltRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """jpeg_channels "each" in headless Chromium: the three channel layers, added up, show
    the bands red, green and blue, left to right, in the xy panel."""
    point_storage(monkeypatch, str(colour_run.root))
    session = serve_run(colour_run.volume.source, colour_run.volume.run_id, layout="xy")
    try:
        assert [layer.name for layer in session.viewer.state.layers] == ["rgb-c0", "rgb-c1", "rgb-c2"]  # fmt: skip
        t0 = time.monotonic()
        chromium.get(session.url)
        while True:
            png = chromium.get_screenshot_as_png()
            bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            found = colour_fractions(bgr[TOP_BARS_PX:])
            if (
                min(f for f, _ in found.values()) >= MIN_BAND
                or time.monotonic() - t0 > LOAD_TIMEOUT_S
            ):
                break
            time.sleep(1.0)
    finally:
        session.stop()
    (tmp_path / "colour.png").write_bytes(png)
    context = f"{found}; screenshot {tmp_path / 'colour.png'}"
    # Each band is a third of the volume, drawn at 1 voxel per pixel: 64 x 128 of the
    # 1000 x 610 pixels below the bars (1.3%), in one colour; red, green, blue from the left.
    assert all(fraction >= MIN_BAND for fraction, _ in found.values()), context
    assert max(f for f, _ in found.values()) < 1.2 * min(f for f, _ in found.values()), context
    assert found["red"][1] < found["green"][1] < found["blue"][1], context
