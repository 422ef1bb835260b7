"""Mail through Airflow's SMTP connection: the "run failed" message of a task's failure callback.

Every task of the DAG has :func:`on_task_failure` as its ``on_failure_callback``
(``DEFAULT_ARGS`` in :mod:`emprocess.workflow.dag`): when a task has failed for good
(after its retries) and the run's conf has ``email``, the address gets one message
naming the task and its error. One per run: the first failure leaves a record
``RUN_ID/notified/AIRFLOW_RUN_ID.json`` in the process bucket, and the failures that
only follow from it (``iswritten`` after a failed stage, anything after a failed
``validate``) send nothing more. Imported when Airflow parses the DAG file, so only the
standard library is imported at module level.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from typing import Any

from emprocess.workflow.taskids import VALIDATE

log = logging.getLogger(__name__)

SMTP_CONN_ID = "smtp_default"
MAX_ERROR_CHARS = 4000
"""The error is cut to this many characters in the message (a batch error lists 20 names)."""


def send_mail(to: str, subject: str, html_body: str) -> str:
    """Send through Airflow's connection ``smtp_default``; returns what happened (never raises)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        BaseHook.get_connection(SMTP_CONN_ID)
    except AirflowNotFoundException:
        msg = f"no Airflow connection {SMTP_CONN_ID!r}; no email sent to {to}"
        log.info(msg)
        return msg
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    try:
        with SmtpHook(smtp_conn_id=SMTP_CONN_ID) as hook:
            hook.send_email_smtp(to=to, subject=subject, html_content=html_body)
    except Exception as e:  # a mail failure must not change the run's outcome
        log.warning("could not email %s: %s", to, e)
        return f"email to {to} failed: {e}"
    return f"emailed {to}"


def failure_email(
    run_id: str, dag_id: str, airflow_run_id: str, task: str, try_number: int, error: str
) -> tuple[str, str]:
    """Subject and HTML body of the "run failed" message."""
    if len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + " ..."
    subject = f"emprocess: {run_id} failed in {task}"
    body = (
        f"<p>Run <b>{html.escape(run_id)}</b> ({html.escape(dag_id)}, Airflow run "
        f"{html.escape(airflow_run_id)}) failed: task <b>{html.escape(task)}</b> "
        f"failed on try {try_number}.</p>"
        f"<p>Error:</p><pre>{html.escape(error)}</pre>"
        "<p>The task's log is in the Airflow UI (the run's Grid, the task, Logs); "
        "clear the task to retry it: finished work is not redone.</p>"
    )
    return subject, body


def _first_failure(conf_data: Mapping[str, Any], airflow_run_id: str, task: str) -> bool:
    """Record this run's first notified failure in the process bucket; False if one is there.

    When the bucket cannot be written (validate failed before it existed, a bad conf),
    the failure counts as the first.
    """
    from emprocess.errors import EmprocessError
    from emprocess.records import NotifiedRecord
    from emprocess.workflow.conf import parse_conf

    try:
        conf = parse_conf(conf_data)
        record = NotifiedRecord(airflow_run_id=airflow_run_id, task=task)
        if not conf.layout.records.write_notified(record):
            return False
    except (EmprocessError, ValueError) as e:
        log.info("no failure record written (%s); sending anyway", e)
    return True


def on_task_failure(context: Mapping[str, Any]) -> None:
    """``on_failure_callback``: mail the conf's ``email`` the failed task and its error."""
    try:
        _notify(context)
    except Exception:  # a callback's error must not hide the task's
        log.exception("failure notification not sent")


def _notify(context: Mapping[str, Any]) -> None:
    ti, dag_run = context["ti"], context["dag_run"]
    conf = dict(dag_run.conf or {})
    to = conf.get("email") or conf.get("mail")  # "mail": the original DAG's key
    if not isinstance(to, str) or not to.strip():
        return
    if ti.task_id != VALIDATE and ti.xcom_pull(task_ids=VALIDATE) is None:
        log.info("%s failed because %s did; that failure was notified", ti.task_id, VALIDATE)
        return
    task = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
    if not _first_failure(conf, str(dag_run.run_id), task):
        log.info("a failure of this run was notified already; no mail for %s", task)
        return
    error = context.get("exception")
    text = f"{type(error).__name__}: {error}" if error is not None else "(no error recorded)"
    subject, body = failure_email(
        str(conf.get("id", "?")), str(dag_run.dag_id), str(dag_run.run_id), task,
        int(ti.try_number), text,
    )  # fmt: skip
    log.info("failure notification: %s", send_mail(to, subject, body))
