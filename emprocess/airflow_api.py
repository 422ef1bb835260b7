"""A small client of Airflow 3's REST API (``/api/v2``): token, DAG, pool, runs, task instances.

Only what ``emprocess trigger`` and ``clear`` need. Every call has a timeout; an error
names the method, the URL, the status and Airflow's ``detail``. With ``retry_s`` set, a
read (GET) outlives an api-server restart: connection errors and 5xx answers are retried
for that long, saying so in the log; with a username and password, a refused token (401,
e.g. expired) is replaced by logging in again, for every method.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from emprocess.errors import EmprocessError

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
FOLLOW_RETRY_S = 600.0
"""How long a command following a run retries an api-server that is away (restart, upgrade)."""
PAGE = 100
"""Task instances per request (Airflow's default ``[api] maximum_page_limit``)."""


class AirflowApiError(EmprocessError):
    """Airflow's REST API refused a request, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _reason(e: requests.RequestException) -> str:
    """The short cause of a connection error ("Connection refused"), not urllib3's repr."""
    text = str(e)
    for cause in ("Connection refused", "Read timed out", "Connection reset", "Name or service"):
        if cause in text:
            return cause
    return text[:300]


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
    retry_s: float = 0.0
    """How long a GET retries connection errors and 5xx answers (0: not at all)."""

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self._session = requests.Session()
        self._credentials: tuple[str, str] | None = None

    def login(self, username: str, password: str) -> str:
        """Get a token with ``POST /auth/token`` (the simple and FAB auth managers) and keep it.

        Retried as a GET is (``retry_s``): asking for a token changes nothing.
        """
        url = f"{self.url}/auth/token"
        body = {"username": username, "password": password}
        r = self._send("POST", url, json=body, params=None, retry_s=self.retry_s, auth=False)
        if r.status_code >= 400:
            raise AirflowApiError(
                f"POST {url} answered {r.status_code} for user {username!r}: {_detail(r)}",
                r.status_code,
            )
        self.token = str(r.json()["access_token"])
        self._credentials = (username, password)
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
        """JSON answer of ``METHOD /api/v2/PATH``; None for a 404 when ``missing_ok``.

        A GET is retried on connection errors and 5xx for up to ``retry_s`` (a POST or
        PATCH is not: it may have been carried out); a 401 logs in again once when
        :meth:`login` was used.
        """
        url = f"{self.url}/api/v2/{path}"
        retry_s = self.retry_s if method == "GET" else 0.0
        r = self._send(method, url, json=json, params=params, retry_s=retry_s)
        if r.status_code == 401 and self._credentials:
            log.info("%s %s answered 401 (token expired?): logging in again", method, url)
            self.login(*self._credentials)
            r = self._send(method, url, json=json, params=params, retry_s=retry_s)
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

    def _send(
        self,
        method: str,
        url: str,
        *,
        json: Any,
        params: dict[str, Any] | None,
        retry_s: float,
        auth: bool = True,
    ) -> requests.Response:
        """One request; connection errors and 5xx retried with backoff for ``retry_s``."""
        deadline = time.monotonic() + retry_s
        delay_s = 1.0
        waiting = False
        while True:
            headers = {"Accept": "application/json"}
            if auth and self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            r: requests.Response | None = None
            try:
                r = self._session.request(
                    method, url, json=json, params=params, headers=headers, timeout=self.timeout_s
                )
                problem = f"answered {r.status_code}" if r.status_code >= 500 else ""
            except requests.RequestException as e:
                problem = f"failed: {_reason(e)}"
            left_s = deadline - time.monotonic()
            if not problem or left_s <= 0:
                break
            if not waiting:
                log.warning(
                    "%s %s %s; waiting for the api-server (retrying for up to %.0f s)",
                    method, url, problem, left_s,
                )  # fmt: skip
                waiting = True
            time.sleep(min(delay_s, left_s))
            delay_s = min(delay_s * 2, 10.0) * random.uniform(0.8, 1.0)
        if r is None:
            raise AirflowApiError(f"{method} {url} {problem}")
        if waiting and not problem:
            log.warning("the api-server at %s answers again", self.url)
        return r

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
        self,
        dag_id: str,
        run_id: str,
        task_ids: list[str] | None,
        *,
        downstream: bool = False,
        only_failed: bool = False,
    ) -> list[dict[str, Any]]:
        """``POST /dags/{dag_id}/clearTaskInstances`` for one run: the UI's "Clear".

        The tasks run again whatever their state (``only_failed``: only failed and
        upstream-failed ones), and the run with them; ``task_ids`` None means every task,
        ``downstream`` also clears the tasks after them. Unlike ``airflow tasks clear -s
        -e``, which selects runs by logical date, this names the run: triggered runs have
        none. Returns the task instances cleared.
        """
        body: dict[str, Any] = {
            "dag_run_id": run_id,
            "dry_run": False,
            "only_failed": only_failed,
            "reset_dag_runs": True,
            "include_downstream": downstream,
        }
        if task_ids is not None:
            body["task_ids"] = task_ids
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
        """The text of a task instance's log (its last try); exceptions as ``Type: message``."""
        lines = []
        for item in self._log_items(dag_id, run_id, ti):
            if isinstance(item, dict):
                text = str(item.get("event", ""))
                if item.get("error_detail"):
                    text += f" {_exception_of(item['error_detail'])}"
                lines.append(text)
            else:
                lines.append(str(item))
        return "\n".join(lines)

    def task_exception(self, dag_id: str, run_id: str, ti: dict[str, Any]) -> str | None:
        """``Type: message`` of the last exception in a task instance's log; None if none."""
        found = None
        for item in self._log_items(dag_id, run_id, ti):
            if isinstance(item, dict) and item.get("error_detail"):
                found = _exception_of(item["error_detail"])
        return found

    def _log_items(self, dag_id: str, run_id: str, ti: dict[str, Any]) -> list[Any]:
        path = (
            f"dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/"
            f"{quote(ti['task_id'])}/logs/{max(1, int(ti.get('try_number') or 1))}"
        )
        doc = self.request(
            "GET", path, params={"map_index": ti.get("map_index", -1), "full_content": True}
        )
        return list(doc.get("content", [])) if isinstance(doc, dict) else []


def _exception_of(detail: Any) -> str:
    """``Type: message`` of the exception in a structured log line's ``error_detail``.

    Airflow 3 logs an exception as structlog's list of stacks (the raised exception
    first, then its causes), each with ``exc_type``, ``exc_value`` and every frame; the
    message is what a user needs, the frames are in the UI's log.
    """
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]
        return f"{first.get('exc_type', 'Exception')}: {first.get('exc_value', '')}"
    return str(detail)[:2000]
