"""The fan-out helper against a real HTTP server on 127.0.0.1 that fails on purpose."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from conftest import point_storage
from dags_conftest_helpers import Answer, Request, ScriptedServer
from tenacity import RetryCallState, Retrying

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.layout import NG_CACHE, WRITE_CACHE
from emprocess.settings import HttpEnv, load
from emprocess.workflow import auth, batch
from emprocess.workflow.batch import (
    BatchError,
    MiniTask,
    ServiceError,
    connection_base_url,
    read_cached,
    run_batch,
)
from emprocess.workflow.http import retry_wait

FAST = HttpEnv(
    http_threads=4, http_attempts=5, http_backoff_s=0.01, http_max_backoff_s=0.05, http_timeout_s=5
)


@pytest.fixture
def local_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    point_storage(monkeypatch, str(tmp_path / "root"))
    (tmp_path / "root").mkdir()
    storage.create_bucket("src_process")
    return "src_process"


def plan(n: int) -> list[MiniTask]:
    return [MiniTask(i, f"z{i:06d}", "/alignedslice", {"slice": i}) for i in range(n)]


def echo(req: Request) -> Answer:
    return Answer(200, {"slice": req.body["slice"], "ok": True})


def test_transient_failures_and_a_timeout_are_retried(local_bucket: str) -> None:
    slow_once = {"done": False}

    def flaky(req: Request) -> Answer:
        if req.number % 3 == 0:
            return Answer(503, {"error": "overloaded"})
        if req.body["slice"] == 5 and not slow_once["done"]:
            slow_once["done"] = True
            return Answer(200, {"slice": 5}, delay_s=1.5)  # longer than the read timeout
        return echo(req)

    cache = f"gs://{local_bucket}/run/{WRITE_CACHE}"
    settings = HttpEnv(
        http_threads=3,
        http_attempts=6,
        http_backoff_s=0.01,
        http_max_backoff_s=0.05,
        http_timeout_s=0.5,
    )
    with ScriptedServer(flaky) as server:
        summary = run_batch(plan(12), base_url=server.url, cache_url=cache, settings=settings)
    assert summary.sent == 12 and summary.cached == 0
    assert summary.attempts > 12  # some were retried
    assert len(server.requests) == summary.attempts
    assert slow_once["done"]
    # The timed-out request was answered again by the retry, which is what got cached.
    answers = read_cached(plan(12), cache)
    assert answers == {f"z{i:06d}": {"slice": i, "ok": True} for i in range(12)}


def test_client_error_fails_at_once_naming_the_mini_task(local_bucket: str) -> None:
    def refuse_3(req: Request) -> Answer:
        if req.body["slice"] == 3:
            return Answer(400, {"error": "transform must hold 6 numbers, got 5"})
        return echo(req)

    cache = f"gs://{local_bucket}/run/{WRITE_CACHE}"
    inline = HttpEnv(http_threads=1, http_attempts=5, http_backoff_s=0.01)
    with ScriptedServer(refuse_3) as server, pytest.raises(BatchError) as info:
        run_batch(plan(8), base_url=server.url, cache_url=cache, settings=inline)
    msg = str(info.value)
    assert "z000003: POST http://127.0.0.1:" in msg
    assert "/alignedslice answered 400: transform must hold 6 numbers, got 5" in msg
    assert info.value.client_error is True
    assert [r.body["slice"] for r in server.requests] == [0, 1, 2, 3]  # no retry, then stop
    assert "5 of 8 mini-tasks failed" in msg  # 3, and 4..7 abandoned after it
    assert "not sent: batch aborted" in msg


def test_exhausted_retries_name_the_mini_task_and_status(local_bucket: str) -> None:
    def always_503(req: Request) -> Answer:
        return Answer(503, {"error": "no instance"}) if req.body["slice"] == 1 else echo(req)

    cache = f"gs://{local_bucket}/c"
    settings = HttpEnv(
        http_threads=2, http_attempts=3, http_backoff_s=0.01, http_max_backoff_s=0.02
    )
    with ScriptedServer(always_503) as server:
        with pytest.raises(
            BatchError, match=r"z000001: POST .* answered 503: no instance \(after 3 attempts\)"
        ) as info:
            run_batch(plan(4), base_url=server.url, cache_url=cache, settings=settings)
        assert info.value.client_error is False
        assert [r.body["slice"] for r in server.requests].count(1) == 3
        # The retried task sends only the mini-task that failed.
        server.requests.clear()
        server.respond = echo
        summary = run_batch(plan(4), base_url=server.url, cache_url=cache, settings=settings)
    assert [r.body["slice"] for r in server.requests] == [1]
    assert (summary.cached, summary.sent) == (3, 1)


@pytest.fixture
def cache_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of the listings of a cache (URLs naming one) and of storage.exists calls."""
    calls = {"list": 0, "exists": 0}
    real_list, real_exists = storage.list_keys, storage.exists

    def counting_list(url: str) -> list[str]:
        calls["list"] += 1 if "cache" in url else 0
        return real_list(url)

    def counting_exists(url: str) -> bool:
        calls["exists"] += 1
        return real_exists(url)

    monkeypatch.setattr(storage, "list_keys", counting_list)
    monkeypatch.setattr(storage, "exists", counting_exists)
    return calls


def test_cache_is_listed_once_and_skips_finished_work(
    bucket: str, cache_calls: dict[str, int]
) -> None:
    calls = cache_calls
    cache = f"gs://{bucket}/run/{NG_CACHE}"
    with ScriptedServer(echo) as server:
        first = run_batch(plan(10), base_url=server.url, cache_url=cache, settings=FAST)
        assert len(server.requests) == 10
        second = run_batch(plan(10), base_url=server.url, cache_url=cache, settings=FAST)
        assert len(server.requests) == 10  # nothing new sent
        # A changed request is not mistaken for a finished one.
        changed = [MiniTask(0, "z000000", "/alignedslice", {"slice": 0, "v": 2}), *plan(10)[1:]]
        third = run_batch(changed, base_url=server.url, cache_url=cache, settings=FAST)
    assert (first.sent, first.cached) == (10, 0)
    assert (second.sent, second.cached) == (0, 10)
    assert (third.sent, third.cached) == (1, 9)
    assert server.requests[-1].body == {"slice": 0, "v": 2}
    assert calls == {"list": 3, "exists": 0}
    record = json.loads(storage.read_bytes(f"{cache}/{plan(10)[4].cache_key()}"))
    assert record["request"] == {"slice": 4} and record["response"] == {"slice": 4, "ok": True}


def test_a_wide_stage_looks_up_only_its_own_answers(
    local_bucket: str, cache_calls: dict[str, int]
) -> None:
    """At width CHECK_EACH_MIN_WIDTH a task checks its own answers one by one, never
    listing the whole stage's cache, and still skips exactly what is finished."""
    width = batch.CHECK_EACH_MIN_WIDTH
    calls = cache_calls
    cache = f"gs://{local_bucket}/run/align/write_cache"
    tasks = plan(3 * width + 2)  # worker 1 owns 1, 65, 129, 193 at width 64
    with ScriptedServer(echo) as server:
        fast = FAST.model_copy(update={"stagger_step_s": 0.0})
        args = {"base_url": server.url, "cache_url": cache, "width": width, "settings": fast}
        run_batch(tasks, worker_id=2, **args)  # another worker's answers are not ours
        first = run_batch(tasks, worker_id=1, **args)
        again = run_batch(tasks, worker_id=1, **args)
    ours = [1, width + 1, 2 * width + 1, 3 * width + 1]
    assert sorted(r.body["slice"] for r in server.requests[3:]) == ours  # after 2, 66, 130
    assert (first.sent, first.cached, again.sent, again.cached) == (4, 0, 0, 4)
    assert calls == {"list": 0, "exists": 3 + 4 + 4}  # one per own mini-task and run


def test_costliest_mini_tasks_are_sent_first(local_bucket: str) -> None:
    costs = [1.0, 8.0, 0.0, 8.0, 3.0]
    tasks = [
        MiniTask(i, f"z{i:06d}", "/alignedslice", {"slice": i}, cost=c) for i, c in enumerate(costs)
    ]
    inline = FAST.model_copy(update={"http_threads": 1})
    with ScriptedServer(echo) as server:
        run_batch(tasks, base_url=server.url, cache_url=f"gs://{local_bucket}/c", settings=inline)
    assert [r.body["slice"] for r in server.requests] == [1, 3, 4, 0, 2]  # ties: plan order


def test_worker_sends_only_its_round_robin_share(local_bucket: str) -> None:
    with ScriptedServer(echo) as server:
        summary = run_batch(
            plan(10),
            base_url=server.url,
            cache_url=f"gs://{local_bucket}/c",
            worker_id=1,
            width=3,
            settings=FAST,
        )
    assert sorted(r.body["slice"] for r in server.requests) == [1, 4, 7]
    assert (summary.planned, summary.worker_id, summary.width) == (3, 1, 3)
    with pytest.raises(EmprocessError, match=r"worker_id 3 is outside 0\.\.2"):
        run_batch(plan(3), base_url=server.url, cache_url="gs://x-y-z/c", worker_id=3, width=3)


def test_bearer_token_only_when_given(local_bucket: str) -> None:
    with ScriptedServer(echo) as server:
        run_batch(plan(1), base_url=server.url, cache_url=f"gs://{local_bucket}/a", settings=FAST)
        run_batch(
            plan(1),
            base_url=server.url,
            cache_url=f"gs://{local_bucket}/b",
            settings=FAST,
            token_source=lambda: "tok123",
        )
    assert "Authorization" not in server.requests[0].headers
    assert server.requests[1].headers["Authorization"] == "Bearer tok123"


def _jwt(exp: float) -> str:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).decode().rstrip("=")
    return f"e30.{claims}.sig"


def test_id_token_is_cached_and_refreshed_before_expiry() -> None:
    fetched: list[str] = []
    lifetime = {"s": 3600.0}

    def fetch(audience: str) -> str:
        fetched.append(audience)
        return _jwt(time.time() + lifetime["s"])

    source = auth.IdTokenSource("https://svc-abc.a.run.app", fetch=fetch, refresh_margin_s=300)
    first = source()
    assert source() == first and len(fetched) == 1
    lifetime["s"] = 100.0  # the next token expires within the margin: fetched every call
    source._expires = 0.0
    source()
    source()
    assert fetched == ["https://svc-abc.a.run.app"] * 3
    assert auth.token_expiry(_jwt(1234.0)) == 1234.0
    assert auth.token_expiry("not-a-jwt") is None


def test_token_source_only_for_https() -> None:
    assert auth.token_source_for("http://127.0.0.1:8080") is None
    source = auth.token_source_for("https://svc-abc.a.run.app/some/path")
    assert isinstance(source, auth.IdTokenSource)
    assert source.audience == "https://svc-abc.a.run.app"


def _failed_try(attempt: int, retry_after_s: float | None = None) -> RetryCallState:
    """tenacity's state after try ``attempt`` failed with a retryable ServiceError."""
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    error = ServiceError("503", retryable=True, status=503, retry_after_s=retry_after_s)
    state.set_exception((ServiceError, error, None))
    return state


def test_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    wait = retry_wait(HttpEnv(http_backoff_s=1.0, http_max_backoff_s=8.0))
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        delays = [wait(_failed_try(attempt)) for _ in range(50)]
        assert all(0.5 * base <= d <= base for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert wait(_failed_try(1, retry_after_s=5.0)) == 5.0
    assert wait(_failed_try(1, retry_after_s=500.0)) == 8.0


def test_which_statuses_are_retried() -> None:
    assert [
        s for s in (400, 401, 403, 404, 408, 409, 422, 429) if batch.is_retryable_status(s)
    ] == [408, 429]
    assert all(batch.is_retryable_status(s) for s in (500, 502, 503, 504, 599))


def test_stagger_only_for_wide_dags() -> None:
    s = HttpEnv(stagger_step_s=0.5)
    assert batch.stagger_s(s, 5, 4) == 0.0
    assert batch.stagger_s(s, 5, batch.STAGGER_MIN_WIDTH) == 2.5
    assert batch.stagger_s(s, 127, 128) == batch.STAGGER_MAX_S == 60.0


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMPROCESS_HTTP_THREADS", "1")
    monkeypatch.setenv("EMPROCESS_HTTP_ATTEMPTS", "2")
    monkeypatch.setenv("EMPROCESS_HTTP_TIMEOUT_S", "3.5")
    s = load(HttpEnv)
    assert (s.http_threads, s.http_attempts, s.http_timeout_s, s.http_backoff_s) == (1, 2, 3.5, 2.0)
    monkeypatch.setenv("EMPROCESS_HTTP_BACKOFF_S", "fast")
    with pytest.raises(EmprocessError, match="EMPROCESS_HTTP_BACKOFF_S='fast'"):
        load(HttpEnv)


@pytest.mark.parametrize(
    ("conn", "url"),
    [
        (("http", "127.0.0.1", 8080, ""), "http://127.0.0.1:8080"),
        (("https", "svc-abc.a.run.app", None, None), "https://svc-abc.a.run.app"),
        (("http", "svc-abc.a.run.app", None, "https"), "https://svc-abc.a.run.app"),
        (("http", "https://svc-abc.a.run.app/", None, None), "https://svc-abc.a.run.app"),
        (("generic", "localhost", 9000, None), "http://localhost:9000"),
    ],
)
def test_connection_base_url(conn: tuple, url: str) -> None:
    assert connection_base_url(*conn) == url


def test_connection_without_host_is_named() -> None:
    with pytest.raises(EmprocessError, match="has no host"):
        connection_base_url("http", None, None, None)
