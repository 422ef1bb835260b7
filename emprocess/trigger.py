"""Trigger a run on a remote Airflow: Cloud Composer through gcloud, or Airflow's REST API.

The conf is built and validated by the same schema as the DAG's Params
(:class:`emprocess.workflow.conf.RunConf`), so a bad conf fails here, before
anything is sent.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
from typing import Any

import requests

from emprocess.errors import EmprocessError

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0


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


def trigger_rest(
    api_url: str, token: str | None, dag_id: str, run_id: str, conf: dict[str, Any]
) -> dict:
    """POST the dag run; returns Airflow's answer. A 409 means the run id is taken."""
    url, body = rest_request(api_url, dag_id, run_id, conf)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = requests.post(url, json=body, headers=headers, timeout=TIMEOUT_S)
    except requests.RequestException as e:
        raise EmprocessError(f"POST {url} failed: {e}") from None
    if r.status_code >= 400:
        raise EmprocessError(f"POST {url} answered {r.status_code}: {r.text[:500]}")
    answer: dict = r.json()
    return answer
