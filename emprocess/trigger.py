"""Trigger a run on a remote Airflow: Cloud Composer through gcloud, or Airflow's REST API.

The conf is built and validated by the same schema as the DAG's Params
(:class:`emprocess.workflow.conf.RunConf`), so a bad conf fails here, before
anything is sent. Through the REST API, :func:`check_ready` first checks what would
otherwise leave a run waiting forever (a paused DAG, a missing or small pool, a
concurrency limit below the width), :func:`follow_run` follows the run to its end
(through api-server restarts when the :class:`AirflowApi` has a ``retry_s``),
:func:`clear_run` redoes a run's tasks and :func:`find_run` finds the DAG of a run id.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from emprocess.airflow_api import AirflowApi, AirflowApiError
from emprocess.errors import EmprocessError
from emprocess.workflow import POOL, POOL_SLOTS
from emprocess.workflow.taskids import BATCH_TASKS

log = logging.getLogger(__name__)

FINAL_STATES = ("success", "failed")


class NotReady(EmprocessError):
    """Airflow is not set up to run the DAG at its width; the message says how to fix it."""


class RunIdTaken(EmprocessError):
    """The DAG already has a run with this run id."""


def composer_command(
    environment: str, location: str, dag_id: str, run_id: str, conf: dict[str, Any]
) -> list[str]:
    """argv of ``gcloud composer environments run ENV --location LOC dags trigger -- ...``."""
    return [
        "gcloud", "composer", "environments", "run", environment, "--location", location,
        "dags", "trigger", "--", dag_id, "--run-id", run_id, "--conf", json.dumps(conf),
    ]  # fmt: skip


def rest_request(api_url: str, dag_id: str, run_id: str, conf: dict[str, Any]) -> tuple[str, dict]:
    """URL and JSON body of Airflow 3's ``POST /api/v2/dags/{dag_id}/dagRuns``."""
    url = f"{api_url.rstrip('/')}/api/v2/dags/{dag_id}/dagRuns"
    return url, {"dag_run_id": run_id, "logical_date": None, "conf": conf}


def trigger_composer(command: list[str]) -> str:
    """Run the gcloud command (never through a shell); returns its output."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise EmprocessError(
            "gcloud is not installed; use --dry-run to print the command"
        ) from None
    if done.returncode != 0:
        raise EmprocessError(
            f"{shlex.join(command[:8])} ... failed ({done.returncode}): {done.stderr[-1000:]}"
        )
    return done.stdout


# -- the REST API ---------------------------------------------------------------------


def check_ready(api: AirflowApi, dag_id: str, width: int, unpause: bool = False) -> list[str]:
    """Check that Airflow will run ``dag_id`` at ``width`` now; return what was done or seen.

    Checks: the DAG exists and is unpaused (``unpause`` unpauses it), its
    ``max_active_tasks`` is at least ``width``, the pool exists with at least ``width``
    slots and, when the api-server exposes its config, ``[core] parallelism`` >= width.

    Raises:
        NotReady: listing every problem with the command that fixes it.
    """
    notes: list[str] = []
    dag = api.dag(dag_id)
    if dag is None:
        raise NotReady(
            f"DAG {dag_id} is not in Airflow: copy emprocess.py and the emprocess/ package "
            "(with an .airflowignore holding 'emprocess/') into the DAG folder and wait for "
            "the dag-processor (`airflow dags list-import-errors` shows why a file failed)"
        )
    problems = []
    if dag.get("is_paused"):
        if unpause:
            api.set_paused(dag_id, False)
            notes.append(f"unpaused DAG {dag_id}")
        else:
            problems.append(
                f"DAG {dag_id} is paused (Airflow pauses new DAGs), so the run would stay "
                f"queued: pass --unpause, or `airflow dags unpause {dag_id}`"
            )
    max_tasks = int(dag.get("max_active_tasks") or 0)
    if max_tasks < width:
        problems.append(
            f"DAG {dag_id} may run {max_tasks} tasks at once (max_active_tasks) but its width "
            f"is {width}: deploy the DAG file of this version of emprocess"
        )
    pool = api.pool(POOL)
    if pool is None:
        problems.append(
            f"pool {POOL} does not exist, so the batch tasks would wait in 'scheduled' "
            f"forever: `airflow pools set {POOL} {POOL_SLOTS} 'emprocess batch tasks'`"
        )
    elif int(pool["slots"]) < width:
        problems.append(
            f"pool {POOL} has {pool['slots']} slots, fewer than the width {width}: "
            f"`airflow pools set {POOL} {max(width, POOL_SLOTS)} 'emprocess batch tasks'`"
        )
    parallelism = api.config_option("core", "parallelism")
    if parallelism is None:
        notes.append("[core] parallelism not exposed by the api-server; not checked")
    elif int(parallelism) < width:
        problems.append(
            f"Airflow's [core] parallelism is {parallelism}, below the width {width}: set "
            f"AIRFLOW__CORE__PARALLELISM={max(width, POOL_SLOTS)} for the scheduler"
        )
    if problems:
        raise NotReady("Airflow is not ready to run it:\n  - " + "\n  - ".join(problems))
    return notes


def trigger_run(api: AirflowApi, dag_id: str, run_id: str, conf: dict[str, Any]) -> dict:
    """POST the dag run; returns Airflow's answer.

    Raises:
        RunIdTaken: the DAG already has a run ``run_id`` (Airflow answers 409).
    """
    try:
        return api.trigger(dag_id, run_id, conf)
    except AirflowApiError as e:
        if e.status != 409:
            raise
    try:
        existing = api.dag_run(dag_id, run_id) or {}
    except AirflowApiError:
        existing = {}
    raise RunIdTaken(
        f"DAG {dag_id} already has a run with id {run_id!r} (state "
        f"{existing.get('state', '?')}): trigger with another --id, or redo that run with "
        f"`emprocess clear {run_id} --api-url {api.url} [--failed] --wait` (finished work "
        "is cached, so only what is missing is sent again)"
    )


def find_run(api: AirflowApi, run_id: str, dag_ids: Iterable[str] | None = None) -> str:
    """The id of the one emprocess DAG that has a run ``run_id``.

    Raises:
        EmprocessError: no DAG has it, or several do (then ``--width`` picks one).
    """
    from emprocess.workflow import WIDTHS, dag_id

    candidates = list(dag_ids) if dag_ids is not None else [
        dag_id(w) for w in (*WIDTHS, None)
    ]  # fmt: skip
    found = [dag for dag in candidates if api.dag(dag) and api.dag_run(dag, run_id)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise EmprocessError(f"no run {run_id!r} in the DAGs {', '.join(candidates)}")
    raise EmprocessError(
        f"run {run_id!r} is in several DAGs ({', '.join(found)}): pick one with --width"
    )


def clear_run(
    api: AirflowApi,
    dag_id: str,
    run_id: str,
    *,
    failed_only: bool = False,
    task_ids: list[str] | None = None,
    downstream: bool = False,
) -> list[str]:
    """Clear a run's tasks so that the scheduler runs them again; returns their names.

    Every task by default (the whole run again: batch tasks find their finished work
    in the cache and send only the rest), only the failed ones with ``failed_only``, or
    ``task_ids`` (with ``downstream``, also every task after them).

    Raises:
        EmprocessError: the run does not exist, a task id is not in the DAG, or nothing
            matched (e.g. ``failed_only`` on a run without failed tasks).
    """
    if api.dag_run(dag_id, run_id) is None:
        raise EmprocessError(f"DAG {dag_id} has no run {run_id!r}")
    if task_ids:
        known = {str(ti["task_id"]) for ti in api.task_instances(dag_id, run_id)}
        unknown = sorted(set(task_ids) - known)
        if unknown:
            raise EmprocessError(
                f"no task {', '.join(unknown)} in run {run_id!r} of {dag_id}; its tasks: "
                f"{', '.join(sorted(known))}"
            )
    cleared = api.clear_tasks(
        dag_id, run_id, task_ids or None, downstream=downstream, only_failed=failed_only
    )
    if not cleared:
        what = "failed tasks" if failed_only else "tasks"
        raise EmprocessError(f"run {run_id!r} of {dag_id} has no {what} to clear")
    return sorted(_ti_name(ti) for ti in cleared)


def peak_concurrency(
    task_instances: Iterable[Mapping[str, Any]], prefixes: tuple[str, ...] = BATCH_TASKS
) -> int:
    """Most task instances (of tasks starting with ``prefixes``) that ran at the same time.

    From each instance's ``start_date`` and ``end_date``, as the REST API gives them.
    """
    events: list[tuple[datetime, int]] = []
    for ti in task_instances:
        if not str(ti["task_id"]).startswith(prefixes) or not ti.get("start_date"):
            continue
        if not ti.get("end_date"):
            continue
        events.append((datetime.fromisoformat(ti["start_date"]), 1))
        events.append((datetime.fromisoformat(ti["end_date"]), -1))
    peak = running = 0
    for _, step in sorted(events):  # at equal times an end (-1) sorts before a start
        running += step
        peak = max(peak, running)
    return peak


@dataclass
class RunOutcome:
    """How a followed run ended."""

    state: str
    seconds: float
    task_instances: list[dict[str, Any]]
    failed: list[str]
    error: str


def follow_run(
    api: AirflowApi,
    dag_id: str,
    run_id: str,
    on_poll: Callable[[str], Any] | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
) -> RunOutcome:
    """Poll the run until it succeeds or fails, calling ``on_poll(state)`` at each poll.

    Args:
        on_poll: e.g. :meth:`emprocess.localrun.RunProgress.poll`, the per-stage bars.
        timeout_s: give up (raise) after this long; None waits for ever.
    """
    t0 = time.monotonic()
    while True:
        run = api.dag_run(dag_id, run_id)
        if run is None:
            raise EmprocessError(f"DAG {dag_id} has no run {run_id!r}")
        state = str(run.get("state"))
        if on_poll:
            on_poll(state)
        if state in FINAL_STATES:
            tis = api.task_instances(dag_id, run_id)
            break
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise EmprocessError(f"run {run_id} of {dag_id} still {state} after {timeout_s} s")
        time.sleep(poll_s)
    # The first task that failed holds the cause; later ones (iswritten) only follow from it.
    failed = sorted(
        (ti for ti in tis if ti.get("state") == "failed"),
        key=lambda ti: str(ti.get("start_date") or ""),
    )
    error = ""
    first = failed[0] if failed else None
    if first is not None:
        try:
            error = api.task_exception(dag_id, run_id, first) or _error_of(
                api.task_log(dag_id, run_id, first)
            )
        except AirflowApiError as e:
            error = f"(log not readable: {e})"
    return RunOutcome(
        state=state,
        seconds=time.monotonic() - t0,
        task_instances=tis,
        failed=[_ti_name(ti) for ti in failed],
        error=error,
    )


def _ti_name(ti: Mapping[str, Any]) -> str:
    index = ti.get("map_index", -1)
    return str(ti["task_id"]) + (f"[{index}]" if index is not None and index >= 0 else "")


def _error_of(log_text: str) -> str:
    """The error a task failed with: its log's exception line (AirflowFailException's text)."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    for marker in ("AirflowFailException", "Exception", "Error"):
        hits = [line for line in lines if marker in line]
        if hits:
            return hits[-1][:2000]
    return "\n".join(lines[-3:])[:2000]
