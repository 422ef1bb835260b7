"""A service caches the answer of every mini-task it finishes, so a killed batch task's
retry sends nothing that finished meanwhile; it writes only its run's own cache key.

The kill: a batch task (a real process running ``run_batch``) sends its requests to the
real emwrite service through a proxy that holds the answers; once the service has
finished them all, the client is killed (SIGKILL) before it hears back, and its retry
runs. Without the run id (so without the headers) the same kill makes the retry send
everything again: the control that shows the test can fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import test_emwrite_service
from faultproxy import FaultProxy

from emprocess import answers, layout, storage
from emprocess.errors import InvalidInput
from emprocess.models import AlignedSliceRequest, AlignRequest, NgShardRequest
from emprocess.settings import HttpEnv
from emprocess.workflow.batch import MiniTask, run_batch

RUN_ID = test_emwrite_service.RUN_ID
bad_env = test_emwrite_service.bad_env  # a small run's buckets, ngmeta done (a fixture)

CLIENT = """
import json, sys
from emprocess.settings import HttpEnv
from emprocess.workflow.batch import MiniTask, run_batch
args = json.loads(sys.argv[1])
run_batch([MiniTask(**t) for t in args["tasks"]], base_url=args["url"],
          cache_url=args["cache"], settings=HttpEnv(http_threads=8, http_attempts=1),
          run_id=args["run_id"])
"""


def slice_tasks(env: dict[str, Any], zs: range) -> list[MiniTask]:
    return [
        MiniTask(
            index=i,
            name=layout.slice_task_name(z),
            path="/alignedslice",
            payload=AlignedSliceRequest(
                img="img.00000.png",
                transform=[1, 0, 0, 1, 0, 0],
                bbox=[100, 80],
                dest=env["src"],
                dest_tmp=env["tmp"],
                slice=z,
                shard_size=1024,
                run_id=RUN_ID,
                clip_limit=0.02,
            ).payload(),
        )
        for i, z in enumerate(zs)
    ]


def kill_mid_flight(
    proxy: FaultProxy, tasks: list[MiniTask], cache: str, run_id: str | None
) -> None:
    """Run the batch in a process, kill it once the service finished every request."""
    proxy.hold = threading.Event()
    proxy.answered.clear()
    args = {
        "tasks": [{"index": t.index, "name": t.name, "path": t.path, "payload": t.payload}
                  for t in tasks],
        "url": proxy.url, "cache": cache, "run_id": run_id,
    }  # fmt: skip
    client = subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(args)], env=os.environ)
    try:
        deadline = time.monotonic() + 120
        while len(proxy.answered) < len(tasks):
            assert client.poll() is None and time.monotonic() < deadline, "client ended early"
            time.sleep(0.05)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        proxy.hold.set()
        proxy.hold = None


@pytest.mark.parametrize("backend", ["local"], indirect=True)
def test_a_killed_batch_tasks_retry_sends_no_finished_request(
    backend: str, emwrite_service: str, bad_env: dict[str, Any]
) -> None:
    run = layout.RunLayout(bad_env["src"], RUN_ID)
    cache = run.process_url(layout.WRITE_CACHE)
    settings = HttpEnv(http_threads=4, http_attempts=1)
    with FaultProxy(emwrite_service) as proxy:
        tasks = slice_tasks(bad_env, range(0, 4))
        kill_mid_flight(proxy, tasks, cache, RUN_ID)
        assert len(proxy.requests) == 4
        # The service cached each answer under the client's own key, before answering.
        for task in tasks:
            record = json.loads(storage.read_bytes(f"{cache}/{task.cache_key()}"))
            assert (record["by"], record["response"], record["request"]) == (
                "service", "success", task.payload,
            )  # fmt: skip
        summary = run_batch(tasks, base_url=proxy.url, cache_url=cache, settings=settings)
        assert (summary.cached, summary.sent, len(proxy.requests)) == (4, 0, 4)

        # The control: the same kill without the run id; the retry sends all 4 again.
        control = slice_tasks(bad_env, range(4, 8))
        kill_mid_flight(proxy, control, cache, None)
        assert len(proxy.requests) == 8
        summary = run_batch(control, base_url=proxy.url, cache_url=cache, settings=settings)
        assert (summary.cached, summary.sent, len(proxy.requests)) == (0, 4, 12)
    print("killed mid-flight: retry sent 0 of 4 (without the service's cache: 4 of 4)")


def test_the_service_writes_only_its_runs_own_key() -> None:
    """The URL comes from the request's run as layout names it; a header that does not fit
    the request (run, name, digest, bucket) is refused, nothing else is trusted."""
    src = "my-src"
    task = MiniTask(
        index=0,
        name=layout.cube_name(1, 0, 2),
        path="/ngshard",
        payload=NgShardRequest(
            dest=layout.RunLayout(src, "r1").ng, write_raw=False, minz=0, maxz=9,
            bbox=[2048, 1024], source=layout.RunLayout(src, "r1").tmp, start=[1, 0, 2],
        ).payload(),
        inputs="0123456789abcdef",
    )  # fmt: skip
    headers = answers.request_headers("r1", task.cache_key(), task.inputs)
    url = answers.service_answer_url(task.path, task.payload, headers)
    assert url == f"gs://my-src_process/r1/neuroglancer/cache/{task.cache_key()}"
    assert answers.service_answer_url(task.path, task.payload, {}) is None  # not asked
    bad = {
        "another run": {**headers, answers.RUN_HEADER: "r2"},
        "no inputs": {k: v for k, v in headers.items() if k != answers.INPUTS_HEADER},
        "another name": {**headers, answers.KEY_HEADER: "cube_0_0_0." + task.cache_key()[-17:]},
        "a path": {**headers, answers.KEY_HEADER: "../../x/" + task.cache_key()},
        "a bad run id": {**headers, answers.RUN_HEADER: "../r1"},
    }
    for why, h in bad.items():
        with pytest.raises(InvalidInput):
            answers.service_answer_url(task.path, task.payload, h)
            pytest.fail(why)
    # /alignedslice: the body's run_id must be the header's run.
    (slice_task,) = slice_tasks({"src": src, "tmp": f"{src}_tmp_{RUN_ID}"}, range(3, 4))
    ok = answers.request_headers(RUN_ID, slice_task.cache_key())
    assert answers.service_answer_url(slice_task.path, slice_task.payload, ok) == (
        f"gs://my-src_process/{RUN_ID}/align/write_cache/{slice_task.cache_key()}"
    )
    with pytest.raises(InvalidInput, match="is not the header's"):
        other = answers.request_headers("r2", answers.answer_key(
            slice_task.name, slice_task.path, slice_task.payload))  # fmt: skip
        answers.service_answer_url(slice_task.path, slice_task.payload, other)


def test_an_align_answer_goes_to_its_sources_affine_cache() -> None:
    """The align request names no run: the header does; the source is the slices' bucket."""
    payload = AlignRequest(
        pre="gs://src-b/img.00001.png", post="gs://src-b/img.00002.png", downsample=2
    ).payload()
    key = answers.answer_key(layout.pair_name(1, 2), "/", payload)
    url = answers.service_answer_url("/", payload, answers.request_headers("r1", key))
    assert url == f"gs://src-b_process/r1/align/affine_cache/{key}"
    with pytest.raises(InvalidInput, match="not named after"):
        bad = answers.answer_key("cube_0_0_0", "/", payload)
        answers.service_answer_url("/", payload, answers.request_headers("r1", bad))
