"""``emprocess clear`` and the REST side of ``trigger``: log in, follow a run, redo one.

The options every command that talks to an Airflow REST API shares (URL, token or user
and password, how long to wait for an api-server that is away) live here once, with the
follow loop that ``trigger --wait``, ``trigger --attach`` and ``clear --wait`` print.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from emprocess.airflow_api import AirflowApi
    from emprocess.workflow.conf import RunConf

from emprocess.airflow_api import FOLLOW_RETRY_S

API_URL = typer.Option(None, "--api-url", help="Airflow REST API base URL, instead of Composer.")
TOKEN = typer.Option(None, envvar="AIRFLOW_API_TOKEN", help="Bearer token for --api-url.")
USERNAME = typer.Option(
    None,
    envvar="AIRFLOW_USERNAME",
    help="Get a token with POST /auth/token as this user (and again when it expires).",
)
PASSWORD = typer.Option(
    None, envvar="AIRFLOW_PASSWORD", help="Password of --username.", show_default=False
)
POLL_S = typer.Option(2.0, "--poll-s", min=0.1, help="Seconds between polls (--wait).")
TIMEOUT_S = typer.Option(
    None, "--timeout-s", min=1, help="Give up waiting for the run after this many seconds."
)
RETRY_S_OPTION = typer.Option(
    FOLLOW_RETRY_S,
    "--retry-s",
    min=0,
    help="While waiting, how long to retry an api-server that does not answer (connection "
    "refused, 5xx) before giving up; the run goes on meanwhile.",
)


def connect(
    api_url: str, token: str | None, username: str | None, password: str | None, retry_s: float
) -> AirflowApi:
    """An :class:`AirflowApi` with a token: the one given, or one from logging in."""
    from emprocess.airflow_api import AirflowApi

    api = AirflowApi(api_url, token=token, retry_s=retry_s)
    if username and not token:
        if password is None:
            raise typer.BadParameter("--username needs --password (or AIRFLOW_PASSWORD)")
        api.login(username, password)
    return api


def run_conf(api: AirflowApi, dag: str, run_id: str) -> RunConf:
    """The conf of an existing run, parsed by the DAG's schema (for its buckets)."""
    from emprocess.errors import EmprocessError
    from emprocess.workflow.conf import parse_conf

    run = api.dag_run(dag, run_id)
    if run is None:
        raise EmprocessError(f"DAG {dag} has no run {run_id!r}")
    return parse_conf(dict(run.get("conf") or {}))


def follow(
    api: AirflowApi,
    dag: str,
    conf: RunConf,
    width: int | None,
    *,
    poll_s: float,
    timeout_s: float | None,
) -> None:
    """Follow the run to its end with per-stage bars, print its outcome and report.

    Raises:
        typer.Exit: with 1 when the run failed.
    """
    from emprocess import trigger as trig
    from emprocess.localrun import RunProgress

    print(f"following run {conf.id} of {dag} ...", flush=True)
    logging.getLogger("emprocess.report").setLevel(logging.WARNING)  # one line per poll
    with RunProgress(conf.source, conf.id) as progress:
        outcome = trig.follow_run(
            api, dag, conf.id, progress.poll, poll_s=poll_s, timeout_s=timeout_s
        )
    peak = trig.peak_concurrency(outcome.task_instances)
    print(
        f"\nrun {conf.id} of {dag}: {outcome.state} after {outcome.seconds:.0f} s; "
        f"batch tasks ran up to {peak} at once" + (f" (width {width})" if width else "")
    )
    print_report_summary(conf)
    if outcome.state != "success":
        print(f"failed tasks: {', '.join(outcome.failed) or 'none'}")
        if outcome.error:
            print(f"error: {outcome.error}")
        raise typer.Exit(1)


def print_report_summary(conf: RunConf) -> None:
    """The summary of ``emprocess report`` for the run, or why there is none."""
    from emprocess.errors import EmprocessError
    from emprocess.report import load_run

    try:
        print("\n" + load_run(conf.source, conf.id).summary_text())
    except EmprocessError as e:
        print(f"\nno report: {e}")


def dag_of(api: AirflowApi, run_id: str, width: int | None) -> str:
    """The DAG of ``run_id``: the one of ``width``, else the one emprocess DAG holding it."""
    from emprocess import trigger as trig
    from emprocess.workflow import WIDTHS, dag_id

    if width is None:
        return trig.find_run(api, run_id)
    return dag_id(width) if width in WIDTHS else dag_id(None)


def clear(
    run_id: str = typer.Argument(..., help="The run's id (its conf id, the Airflow run id)."),
    failed: bool = typer.Option(
        False, "--failed", help="Clear only the failed (and upstream-failed) tasks."
    ),
    tasks: list[str] = typer.Option(
        None,
        "--task",
        help="Clear this task (repeatable), e.g. ngingest.write_ng_shards_0.",
        show_default=False,
    ),
    downstream: bool = typer.Option(
        False, "--downstream", help="With --task: also clear every task after it."
    ),
    width: int = typer.Option(
        None,
        min=1,
        help="The run's DAG width; default: the one emprocess DAG that has a run RUN_ID.",
    ),
    api_url: str = typer.Option(..., "--api-url", help="Airflow REST API base URL."),
    token: str = TOKEN,
    username: str = USERNAME,
    password: str = PASSWORD,
    wait: bool = typer.Option(
        False, help="Follow the run again to its end, then print its report."
    ),
    poll_s: float = POLL_S,
    timeout_s: float = TIMEOUT_S,
    retry_s: float = RETRY_S_OPTION,
) -> None:
    """Redo a run on an Airflow REST API: clear its tasks so the scheduler runs them again.

    Every task by default, only the failed ones with --failed, or the --task ones. Each
    batch task finds its finished work in the run's cache and sends only the rest, so a
    finished run cleared whole sends no request.
    """
    from emprocess import trigger as trig
    from emprocess.errors import EmprocessError

    if failed and tasks:
        raise typer.BadParameter("give either --failed or --task, not both")
    if downstream and not tasks:
        raise typer.BadParameter("--downstream needs --task")
    try:
        api = connect(api_url, token, username, password, retry_s)
        dag = dag_of(api, run_id, width)
        conf = run_conf(api, dag, run_id)
        cleared = trig.clear_run(
            api, dag, run_id, failed_only=failed, task_ids=tasks or None, downstream=downstream
        )
        print(f"cleared {len(cleared)} task(s) of run {run_id} of {dag}: {', '.join(cleared)}")
        if wait:
            follow(api, dag, conf, None, poll_s=poll_s, timeout_s=timeout_s)
    except EmprocessError as e:
        print(f"clear failed: {e}")
        raise typer.Exit(1) from None
