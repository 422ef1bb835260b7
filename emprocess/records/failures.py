"""The failure records of one stage's mini-tasks: ``failures/STAGE/NAME.json``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.records.base import now_iso
from emprocess.records.models import FailureRecord

log = logging.getLogger(__name__)


def failure_key(name: str) -> str:
    """Key of mini-task ``name``'s failure record under its stage's failure prefix."""
    return f"{name}.json"


def failure_name(key: str) -> str:
    """The mini-task name of failure record key ``key`` (``NAME.json``)."""
    return key.split(".")[0]


class _Request(Protocol):
    """A mini-task as a failure record names it."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def payload(self) -> Mapping[str, Any]: ...


class FailureRecords:
    """The failure records of one stage (:class:`FailureRecord`): ``NAME.json`` under the
    stage's failure prefix (:meth:`RunRecords.failure_url`), written by the batch tasks.

    One listing at the start tells which mini-tasks have a record, so a success deletes
    only records that exist. Records are for monitoring: failing to write or delete one
    is logged, never raised, so it cannot hide the mini-task's own outcome.
    """

    def __init__(self, url: str | None, stage: str) -> None:
        self.url = url.rstrip("/") if url else None
        self.stage = stage
        self._lock = threading.Lock()
        self._present: set[str] = set()
        if self.url is not None:
            try:
                start = len(storage.parse_url(self.url + "/").key)
                keys = storage.list_keys(self.url + "/")
                self._present = {failure_name(k[start:]) for k in keys}
            except EmprocessError as e:
                log.warning("cannot list failure records %s: %s", self.url, e)

    def write(self, task: _Request, error: str, status: int | None, attempts: int) -> None:
        """Record that ``task`` finally failed (``attempts`` requests, last ``status``)."""
        if self.url is None:
            return
        record = FailureRecord(
            name=task.name,
            stage=self.stage,
            path=task.path,
            request=dict(task.payload),
            error=error,
            status=status,
            attempts=attempts,
            finished=now_iso(),
        )
        try:
            storage.write_bytes(
                storage.join(self.url, failure_key(task.name)),
                record.to_bytes(),
                content_type="application/json",
            )
        except Exception as e:  # monitoring only: keep the mini-task's own error
            log.warning("cannot write the failure record of %s: %s", task.name, e)
            return
        with self._lock:
            self._present.add(task.name)

    def clear(self, task: _Request) -> None:
        """Delete the failure record of ``task``, which has now been answered, if it has one."""
        with self._lock:
            if self.url is None or task.name not in self._present:
                return
            self._present.discard(task.name)
        try:
            storage.delete(storage.join(self.url, failure_key(task.name)))
        except Exception as e:  # monitoring only
            log.warning("cannot delete the failure record of %s: %s", task.name, e)
