"""A failed run mails the conf's ``email`` once, naming the task and its error (SMTP sink)."""

from __future__ import annotations

import email
import json
from typing import Any

import pytest
from conftest import point_storage, unique_bucket
from dags_conftest_helpers import e2e_conf, run_e2e, write_e2e_stack

from emprocess import storage
from emprocess.workflow import dag_id

NOWHERE = "http://127.0.0.1:9"
"""No service is reached: validate fails first, or the proxy answers every request."""


@pytest.fixture(scope="module")
def stack(gcs_emulator: str) -> tuple[str, dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, None)
        source = unique_bucket("fail")
        storage.create_bucket(source)
        return source, write_e2e_stack(source)


def _text(message: dict[str, Any]) -> str:
    """Subject and decoded HTML body of a message the SMTP sink kept."""
    msg = email.message_from_string(message["data"])
    parts = [p.get_payload(decode=True).decode() for p in msg.walk() if not p.is_multipart()]
    return f"Subject: {msg['Subject']}\n" + "\n".join(parts)


def _run(mp: pytest.MonkeyPatch, dag_bag: Any, stack: Any, **kw: Any) -> Any:
    point_storage(mp, None)
    source, truth = stack
    conf = e2e_conf(kw.pop("run_id"), source, truth, **kw.pop("conf"))
    return run_e2e(
        mp, dag_bag.dags[dag_id(1)], conf, truth, NOWHERE, NOWHERE, backend="gcs", smtp=True,
        **kw,
    )  # fmt: skip


def test_a_failed_validate_mails_its_error_once(
    airflow_db: Any, dag_bag: Any, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run(
        monkeypatch, dag_bag, stack, run_id="badz",
        conf={"maxz": 13, "mail": "lab@example.org"},  # the original DAG's key for email
    )  # fmt: skip
    assert run.state == "failed" and run.task_states["validate"] == "failed"
    assert run.task_states["iswritten"] == "failed"  # no second mail for it
    assert [m["rcpt"] for m in run.smtp_messages] == [["<lab@example.org>"]]
    data = _text(run.smtp_messages[0])
    assert "Subject: emprocess: badz failed in validate" in data
    assert "missing 2 of 14 slices" in data and "stack/img.00013.png" in data


def test_a_failed_batch_task_mails_once_and_names_the_task(
    airflow_db: Any, dag_bag: Any, stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse = json.dumps({"error": "pre: not a readable image"}).encode()
    run = _run(
        monkeypatch, dag_bag, stack, run_id="refused", conf={"email": "lab@example.org"},
        align_rules=[lambda r: (400, refuse) if r.path == "/" else (200, b"{}")],
    )  # fmt: skip
    assert run.state == "failed"
    assert run.task_states["align.affine_0"] == "failed"
    assert run.task_states["iswritten"] == "failed"
    assert len(run.smtp_messages) == 1, [m["data"][:200] for m in run.smtp_messages]
    data = _text(run.smtp_messages[0])
    assert "Subject: emprocess: refused failed in align.affine_0" in data
    assert "11 of 11 mini-tasks failed" in data and "not a readable image" in data
    notified = storage.list_keys(f"gs://{run.source}_process/refused/notified/")
    assert len(notified) == 1
