"""The REST client's waiting: api-server away (refused, 503), expired token (401), and what
is never retried; ``trigger``'s width default and the failing task's exception message.

A small HTTP server plays Airflow's API here and injects the faults; the real api-server
restart is in ``tests/test_airflow_server.py``.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from emprocess.airflow_api import AirflowApi, AirflowApiError
from emprocess.cli import app
from emprocess.localrun import free_port

RUN = {"dag_run_id": "r1", "state": "running", "conf": {}}


@dataclass
class FakeAirflow:
    """Answers /auth/token and GET/POST dagRuns; ``fail`` holds the statuses to answer
    first (then the real answer); only the newest token is accepted."""

    port: int
    fail: list[int] = field(default_factory=list)
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    tokens: int = 0

    @contextmanager
    def serve(self, after_s: float = 0.0) -> Iterator[None]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                auth = self.headers.get("Authorization")
                fake.seen.append((self.command, self.path, auth))
                if self.path == "/auth/token":
                    fake.tokens += 1
                    return self._answer(201, {"access_token": f"t{fake.tokens}"})
                if fake.fail:
                    status = fake.fail.pop(0)
                    return self._answer(status, {"detail": f"injected {status}"})
                if auth != f"Bearer t{fake.tokens}":
                    return self._answer(401, {"detail": "Invalid JWT token"})
                return self._answer(200, RUN)

            do_GET = do_POST = _handle

        server: list[ThreadingHTTPServer] = []

        def start() -> None:
            time.sleep(after_s)
            server.append(ThreadingHTTPServer(("127.0.0.1", self.port), Handler))
            server[0].serve_forever()

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        while not after_s and not server:  # bound before the test talks to it
            time.sleep(0.01)
        try:
            yield
        finally:
            while not server and thread.is_alive():
                time.sleep(0.05)
            if server:
                server[0].shutdown()
                server[0].server_close()


@pytest.fixture
def fake() -> FakeAirflow:
    return FakeAirflow(free_port())


def test_a_get_waits_for_an_api_server_that_is_away_and_says_so(
    fake: FakeAirflow, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused for 2 s (restart), then 503 twice: the login and the GET wait it out."""
    fake.fail = [503, 503]
    api = AirflowApi(f"http://127.0.0.1:{fake.port}", retry_s=60)
    with caplog.at_level(logging.WARNING, "emprocess.airflow_api"):
        t0 = time.monotonic()
        with fake.serve(after_s=2.0):
            api.login("u", "p")
            assert api.dag_run("d", "r1") == RUN
    assert time.monotonic() - t0 >= 2.0
    said = caplog.text
    assert "POST http://127.0.0.1" in said and "failed: Connection refused" in said
    assert "answered 503; waiting for the api-server (retrying for up to" in said
    assert said.count("answers again") == 2
    assert [(m, p) for m, p, _ in fake.seen] == [
        ("POST", "/auth/token"), *[("GET", "/api/v2/dags/d/dagRuns/r1")] * 3,
    ]  # fmt: skip


def test_an_expired_token_is_replaced_by_logging_in_again(fake: FakeAirflow) -> None:
    with fake.serve():
        api = AirflowApi(f"http://127.0.0.1:{fake.port}")
        api.login("u", "p")
        fake.tokens += 1  # the server now wants a newer token than the client holds
        assert api.dag_run("d", "r1") == RUN
        assert fake.tokens == 3 and api.token == "t3"
        # A token given as it is (--token) cannot be renewed: the 401 names the way out.
        given = AirflowApi(f"http://127.0.0.1:{fake.port}", token="old")
        with pytest.raises(AirflowApiError, match=r"token was refused.*pass --token") as e:
            given.dag_run("d", "r1")
        assert e.value.status == 401


def test_without_retry_s_or_for_a_post_nothing_is_retried(fake: FakeAirflow) -> None:
    api = AirflowApi(f"http://127.0.0.1:{fake.port}", token="t0")
    t0 = time.monotonic()
    with pytest.raises(AirflowApiError, match=r"GET http://127.0.0.1:\d+/api/v2/.* Connection"):
        api.dag_run("d", "r1")
    assert time.monotonic() - t0 < 5
    with fake.serve():
        fake.fail = [503]
        api.retry_s = 60  # a POST may have been carried out: it is never sent twice
        with pytest.raises(AirflowApiError, match="answered 503: injected 503") as e:
            api.trigger("d", "r1", {})
        assert e.value.status == 503 and len(fake.seen) == 1


def test_the_failing_tasks_exception_is_its_type_and_message() -> None:
    from emprocess.airflow_api import _exception_of

    detail = [
        {"exc_type": "AirflowFailException", "exc_value": "missing 5 of 17 slices",
         "exc_notes": [], "is_cause": False, "frames": [{"filename": "/x.py", "lineno": 3}]},
        {"exc_type": "InvalidInput", "exc_value": "cause", "is_cause": True, "frames": []},
    ]  # fmt: skip
    assert _exception_of(detail) == "AirflowFailException: missing 5 of 17 slices"
    assert _exception_of("plain text") == "plain text"


@pytest.mark.parametrize(
    ("args", "dag", "width"),
    [
        (["--conf", '{"id": "c1", "image": "i%d.png", "minz": 0, "maxz": 3, "source": "sbk"}'],
         "emprocess_width4_v", None),
        (["--conf", '{"id": "c1", "image": "i%d.png", "minz": 0, "maxz": 3, "source": "sbk", '
          '"width": 7}'], "emprocess_v", 7),
        (["sbk", "--image", "i%d.png", "--minz", "0", "--maxz", "3", "--id", "c1"],
         "emprocess_width4_v", None),
        (["sbk", "--image", "i%d.png", "--minz", "0", "--maxz", "3", "--id", "c1", "--width",
          "32"], "emprocess_width32_v", None),
    ],
)  # fmt: skip
def test_trigger_width_is_the_confs_else_4(args: list[str], dag: str, width: int | None) -> None:
    result = CliRunner().invoke(
        app, ["trigger", *args, "--composer-env", "e", "--location", "l", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    assert argv[10].startswith(dag), argv[10]
    assert json.loads(argv[argv.index("--conf") + 1]).get("width") == width


def test_clear_refuses_contradicting_options() -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["clear", "r1", "--api-url", "http://h", "--failed", "--task", "a"])
    assert both.exit_code == 2 and "either --failed or --task" in both.output
    alone = runner.invoke(app, ["clear", "r1", "--api-url", "http://h", "--downstream"])
    assert alone.exit_code == 2 and "--downstream needs --task" in alone.output
