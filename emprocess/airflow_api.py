"""A small client of Airflow 3's REST API (``/api/v2``): token, DAG, pool, runs, task instances.

Only what ``emprocess trigger`` needs. Every call has a timeout; an error names the
method, the URL, the status and Airflow's ``detail``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from emprocess.errors import EmprocessError

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
PAGE = 100
"""Task instances per request (Airflow's default ``[api] maximum_page_limit``)."""


class AirflowApiError(EmprocessError):
    """Airflow's REST API refused a request, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _detail(r: requests.Response) -> str:
    try:
        detail = r.json().get("detail", r.text)
    except ValueError:
        detail = r.text
    return str(detail)[:500]


@dataclass
class AirflowApi:
    """Airflow's REST API at ``url`` (e.g. ``http://127.0.0.1:8080``), with a bearer token."""

    url: str
    token: str | None = None
    timeout_s: float = TIMEOUT_S

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self._session = requests.Session()

    def login(self, username: str, password: str) -> str:
        """Get a token with ``POST /auth/token`` (the simple and FAB auth managers) and keep it."""
        url = f"{self.url}/auth/token"
        try:
            r = self._session.post(
                url, json={"username": username, "password": password}, timeout=self.timeout_s
            )
        except requests.RequestException as e:
            raise AirflowApiError(f"POST {url} failed: {e}") from None
        if r.status_code >= 400:
            raise AirflowApiError(
                f"POST {url} answered {r.status_code} for user {username!r}: {_detail(r)}",
                r.status_code,
            )
        self.token = str(r.json()["access_token"])
        return self.token

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        """JSON answer of ``METHOD /api/v2/PATH``; None for a 404 when ``missing_ok``."""
        url = f"{self.url}/api/v2/{path}"
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            r = self._session.request(
                method, url, json=json, params=params, headers=headers, timeout=self.timeout_s
            )
        except requests.RequestException as e:
            raise AirflowApiError(f"{method} {url} failed: {e}") from None
        if r.status_code == 404 and missing_ok:
            return None
        if r.status_code in (401, 403):
            how = "the token was refused" if self.token else "no token was given"
            raise AirflowApiError(
                f"{method} {url} answered {r.status_code} ({how}): {_detail(r)}; pass --token, "
                "or --username and --password (env AIRFLOW_API_TOKEN / AIRFLOW_USERNAME / "
                "AIRFLOW_PASSWORD)",
                r.status_code,
            )
        if r.status_code >= 400:
            raise AirflowApiError(
                f"{method} {url} answered {r.status_code}: {_detail(r)}", r.status_code
            )
        return r.json() if r.content else None

    # -- resources -------------------------------------------------------------

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """``GET /dags/{dag_id}``: ``is_paused``, ``max_active_tasks``, ...; None if unknown."""
        answer: dict[str, Any] | None = self.request(
            "GET", f"dags/{quote(dag_id)}", missing_ok=True
        )
        return answer

    def set_paused(self, dag_id: str, paused: bool) -> dict[str, Any]:
        """``PATCH /dags/{dag_id}?update_mask=is_paused``."""
        answer: dict[str, Any] = self.request(
            "PATCH",
            f"dags/{quote(dag_id)}",
            json={"is_paused": paused},
            params={"update_mask": "is_paused"},
        )
        return answer

    def pool(self, name: str) -> dict[str, Any] | None:
        """``GET /pools/{name}``: ``slots``, ``open_slots``, ...; None if it does not exist."""
        answer: dict[str, Any] | None = self.request("GET", f"pools/{quote(name)}", missing_ok=True)
        return answer

    def config_option(self, section: str, option: str) -> str | None:
        """The api-server's ``[section] option``, or None when Airflow does not expose its config."""
        try:
            doc = self.request("GET", f"config/section/{section}/option/{option}")
        except AirflowApiError as e:
            if e.status in (403, 404):  # [api] expose_config is False by default
                return None
            raise
        for sec in doc.get("sections", []):
            for opt in sec.get("options", []):
                if opt.get("key") == option:
                    return str(opt.get("value"))
        return None

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> dict[str, Any]:
        """``POST /dags/{dag_id}/dagRuns``; a taken run id raises with status 409."""
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf}
        answer: dict[str, Any] = self.request("POST", f"dags/{quote(dag_id)}/dagRuns", json=body)
        return answer

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any] | None:
        """``GET /dags/{dag_id}/dagRuns/{run_id}``: ``state``, dates, conf; None if unknown."""
        answer: dict[str, Any] | None = self.request(
            "GET", f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}", missing_ok=True
        )
        return answer

    def clear_tasks(
        self, dag_id: str, run_id: str, task_ids: list[str], *, downstream: bool = False
    ) -> list[dict[str, Any]]:
        """``POST /dags/{dag_id}/clearTaskInstances`` for one run: the UI's "Clear".

        The tasks run again whatever their state (and the run with them), ``downstream``
        also clears the tasks after them. Unlike ``airflow tasks clear -s -e``, which
        selects runs by logical date, this names the run: triggered runs have none.
        Returns the task instances cleared.
        """
        body = {
            "dag_run_id": run_id,
            "task_ids": task_ids,
            "dry_run": False,
            "only_failed": False,
            "reset_dag_runs": True,
            "include_downstream": downstream,
        }
        answer = self.request("POST", f"dags/{quote(dag_id)}/clearTaskInstances", json=body)
        return list(answer.get("task_instances", []))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run (all pages): ``task_id``, ``state``, dates, ..."""
        out: list[dict[str, Any]] = []
        path = f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances"
        while True:
            page = self.request("GET", path, params={"limit": PAGE, "offset": len(out)})
            items = page.get("task_instances", [])
            out.extend(items)
            if not items or len(out) >= int(page.get("total_entries", 0)):
                return out

    def task_log(self, dag_id: str, run_id: str, ti: dict[str, Any]) -> str:
        """The text of a task instance's log (its last try)."""
        path = (
            f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/"
            f"{quote(ti['task_id'])}/logs/{max(1, int(ti.get('try_number') or 1))}"
        )
        doc = self.request(
            "GET", path, params={"map_index": ti.get("map_index", -1), "full_content": True}
        )
        lines = []
        for item in doc.get("content", []) if isinstance(doc, dict) else []:
            if isinstance(item, dict):
                text = str(item.get("event", ""))
                if item.get("error_detail"):
                    text += f" {item['error_detail']}"
                lines.append(text)
            else:
                lines.append(str(item))
        return "\n".join(lines)
