"""What every stage shares: the :class:`RunInfo` validate hands on, the batch sender
and the helpers of messages and records."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from emprocess.settings import HttpEnv
from emprocess.workflow.batch import MiniTask, run_batch
from emprocess.workflow.conf import RunConf

SHOWN = 10
"""How many names a problem message lists before "..."."""


class RunInfo(BaseModel):
    """What ``validate`` hands on: the parsed conf, the width, the slice size."""

    conf: RunConf
    width: int
    slice_size_xy: tuple[int, int]
    dag_id: str
    slice_bits: int = 8
    intensity_window: tuple[float, float] | None = None
    window_pending: bool = False
    """An ``auto`` window still to be measured (the DAG's ``measure_window`` task)."""

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _names(names: Sequence[str]) -> str:
    more = ", ..." if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def _send(
    info: RunInfo,
    tasks: Sequence[MiniTask],
    stage: str,
    cache: str,
    base_url: str,
    settings: HttpEnv | None,
    worker_id: int = 0,
    width: int = 1,
    redo: Collection[str] | Callable[[list[MiniTask]], Collection[str]] = (),
) -> dict[str, Any]:
    """Run one batch task of ``stage``: its answers under ``cache``, its failures beside."""
    conf = info.conf
    return run_batch(
        tasks,
        base_url=base_url,
        cache_url=conf.layout.process_url(cache),
        worker_id=worker_id,
        width=width,
        stage=stage,
        settings=settings,
        failure_url=conf.layout.failure_url(stage),
        redo=redo,
        run_id=conf.id,
    ).to_json()
