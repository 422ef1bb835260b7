"""``emprocess bench run``: a small real local run, with each stage's CPU use and MB/s per core.

The run is ``emprocess run``'s: both services under gunicorn (sized by
:func:`emprocess.localsize.size_local_run`), the DAG through ``airflow dags test``, on a
synthetic stack under a local storage root. A thread samples the CPU time of every
process this one started (the services' gunicorn masters and workers, Airflow and
whatever it starts; processes already reaped count through their parent), so the
figures are our processes' own use, whatever else runs on the machine. A stage's
utilisation is its CPU seconds over its wall time (first batch task started to last
finished, from complete.json) times the cores. The machine-wide busy share over the
same window is printed beside it, to show how much others took.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

if TYPE_CHECKING:
    from emprocess.settings import StorageEnv

STAGES = {
    "features": "align.features",
    "align": "align.affine",
    "write": "align.write",
    "shards": "ngingest.write_ng_shards",
}
"""Stages whose utilisation is measured: label -> stage name in complete.json."""

SOURCE = "bench-stack"
RUN_ID = "bench"


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds (user + system) of ``root``'s descendants, living or reaped (not its own)."""
    own = root.cpu_times()
    total = own.children_user + own.children_system
    for proc in root.children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited between the listing and the read
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent not idle (every process, ours or not)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass
class CpuSampler:
    """Samples (wall time, our CPU seconds, machine busy seconds) on a thread."""

    period_s: float = 0.2
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        me = psutil.Process()
        self.samples.append((time.time(), tree_cpu_seconds(me), machine_busy_seconds()))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._sample()

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """(our CPU seconds, machine busy seconds) from ``t0`` to ``t1`` (interpolated)."""
        arr = np.array(self.samples)
        ours = np.interp([t0, t1], arr[:, 0], arr[:, 1])
        busy = np.interp([t0, t1], arr[:, 0], arr[:, 2])
        return float(ours[1] - ours[0]), float(busy[1] - busy[0])


@dataclass
class StageFigure:
    label: str
    wall_s: float
    cpu_s: float
    machine_busy_s: float
    cores: int

    @property
    def utilisation(self) -> float:
        return self.cpu_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0

    @property
    def machine_utilisation(self) -> float:
        return self.machine_busy_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0


@dataclass
class RunBenchmark:
    """What ``emprocess bench run`` measured."""

    slices: int
    size: int
    width: int
    sizing: str
    cores: int
    wall_s: float
    cpu_s: float
    megabytes: float
    stages: list[StageFigure]

    def report(self) -> str:
        lines = [
            f"local run of {self.slices} slices of {self.size}^2 px (8-bit), width {self.width}",
            f"  {self.sizing}",
            "  stage    wall s   our CPU s   our CPU / cores   machine busy (all processes)",
        ]
        for s in self.stages:
            lines.append(
                f"  {s.label:<7} {s.wall_s:7.1f} {s.cpu_s:11.1f} {s.utilisation:16.0%}"
                f" {s.machine_utilisation:17.0%}"
            )
        lines += [
            f"  whole run (services started to complete.json): {self.wall_s:.1f} s wall, "
            f"{self.cpu_s:.1f} s CPU of our processes",
            f"  end to end: {self.megabytes:.0f} MB in, "
            f"{self.megabytes / (self.wall_s * self.cores):.2f} MB/s per core of wall time, "
            f"{self.megabytes / self.cpu_s:.2f} MB per CPU second",
        ]
        return "\n".join(lines)


def _fresh_run(conf: Any) -> None:
    """Delete the buckets of an earlier benchmark run, so nothing is taken from its caches."""
    from emprocess import storage

    for role, name in conf.bucket_names().items():
        if role != "source" and storage.bucket_exists(name):
            storage.delete_bucket(name, force=True)


def run_benchmark(
    workdir: Path,
    slices: int = 64,
    size: int = 2048,
    width: int = 4,
    downsample: int = 2,
    workers: int | None = None,
    threads: int | None = None,
) -> RunBenchmark:
    """A real local run on a synthetic stack under ``workdir``; the stack is kept for reuse."""
    from emprocess import storage
    from emprocess.settings import StorageEnv, load

    workdir = workdir.resolve()
    chosen = load(StorageEnv, storage_root=workdir / "storage")
    with storage.use(chosen):
        return _run(workdir, chosen, slices, size, width, downsample, workers, threads)


def _run(
    workdir: Path,
    chosen: StorageEnv,
    slices: int,
    size: int,
    width: int,
    downsample: int,
    workers: int | None,
    threads: int | None,
) -> RunBenchmark:
    """:func:`run_benchmark` with its storage chosen."""
    from emprocess import storage
    from emprocess.localrun import run_dag
    from emprocess.localsize import size_local_run
    from emprocess.sample import write_sample
    from emprocess.workflow import WIDTHS, dag_id
    from emprocess.workflow.conf import parse_conf

    storage.create_bucket(SOURCE)
    truth = storage.bucket_url(SOURCE, "truth.json")
    stack = storage.bucket_url(SOURCE)
    have = json.loads(storage.read_bytes(truth)) if storage.exists(truth) else {}
    if (have.get("maxz"), have.get("width")) != (slices - 1, size):
        for name in storage.list_keys(stack):
            storage.delete(storage.bucket_url(SOURCE, name))
        write_sample(stack, slices, size, size, seed=0)
    fixed = width in WIDTHS
    conf = parse_conf(
        {
            "id": RUN_ID, "source": SOURCE, "image": "img.%05d.png", "minz": 0,
            "maxz": slices - 1, "downsample_factor": downsample,
            **({} if fixed else {"width": width}),
        }
    )  # fmt: skip
    _fresh_run(conf)
    sizing = size_local_run(workers=workers, threads=threads)
    t0 = time.time()
    with CpuSampler() as sampler:
        doc = run_dag(
            conf, dag_id(width if fixed else None), workdir, sizing=sizing,
            storage_settings=chosen,
        )  # fmt: skip
    t1 = time.time()
    cpu_s, _ = sampler.between(t0, t1)
    figures = []
    for label, name in STAGES.items():
        st = doc["stages"].get(name)
        if not st:
            continue
        s0 = datetime.fromisoformat(st["started"]).timestamp()
        s1 = datetime.fromisoformat(st["finished"]).timestamp()
        ours, busy = sampler.between(s0, s1)
        figures.append(StageFigure(label, s1 - s0, ours, busy, sizing.cores))
    return RunBenchmark(
        slices=slices, size=size, width=width, sizing=sizing.describe(), cores=sizing.cores,
        wall_s=t1 - t0, cpu_s=cpu_s, megabytes=slices * size * size / 1e6, stages=figures,
    )  # fmt: skip
