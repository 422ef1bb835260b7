"""``emprocess bench run``: a real local run, with each stage's CPU use and MB/s per core.

The run is ``emprocess run``'s: both services under gunicorn (sized by
:func:`emprocess.localsize.size_local_run`), the DAG through ``airflow dags test``, on a
synthetic stack (:mod:`emprocess_bench.bigslices`: any size, 8- or 16-bit) under a local
storage root in the working folder. A thread samples the CPU time of every
process this one started (the services' gunicorn masters and workers, Airflow and
whatever it starts; processes already reaped count through their parent), so the
figures are our processes' own use, whatever else runs on the machine. A stage's
utilisation is its CPU seconds over its wall time (first task started to last
finished, from complete.json) times the cores. The machine-wide busy share over the
same window is printed beside it, to show how much others took. Every task of the DAG
gets a row; align, write and shards, which move the pixels, also MB/s per core (10^6
input pixels per second of the stage's wall time per core).

Each request's peak memory is its gunicorn worker's ``VmHWM``, reset before the request
(:mod:`emprocess_bench.gunicorn_peak`, whose hooks the services' gunicorn config adds), so it is the
most the worker held while serving that request, as a Cloud Run instance with
concurrency 1 would; the table gives the largest and the median per endpoint, with each
request's median wall and CPU seconds (CPU / wall = the cores a request keeps busy).
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

from emprocess.workflow.taskids import AFFINE, FEATURES, SHARDS, WRITE

if TYPE_CHECKING:
    from emprocess.settings import StorageEnv

STAGES = {"features": FEATURES, "align": AFFINE, "write": WRITE, "shards": SHARDS}
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


def largest_other_rss(root: psutil.Process) -> int:
    """Bytes resident in the largest of ``root``'s descendants that is not a gunicorn
    process: the Airflow task process of ``dags test``, which runs every task."""
    largest = 0
    for proc in root.children(recursive=True):
        try:
            if "gunicorn" not in " ".join(proc.cmdline()[:3]):
                largest = max(largest, proc.memory_info().rss)
        except psutil.Error:
            continue
    return largest


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent not idle (every process, ours or not)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass
class CpuSampler:
    """Samples (wall time, our CPU seconds, machine busy seconds) on a thread."""

    period_s: float = 0.2
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)
    """(time, our CPU s, machine busy s, largest non-service process's RSS in bytes)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        me = psutil.Process()
        self.samples.append(
            (time.time(), tree_cpu_seconds(me), machine_busy_seconds(), largest_other_rss(me))
        )

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

    def largest_rss(self, t0: float, t1: float) -> float:
        """The largest sampled RSS of a non-service process from ``t0`` to ``t1``, MiB
        (the samples just before and after count too: a short stage may fall between)."""
        arr = np.array(self.samples)
        lo = max(int(np.searchsorted(arr[:, 0], t0)) - 1, 0)
        hi = int(np.searchsorted(arr[:, 0], t1)) + 1
        return float(arr[lo:hi, 3].max()) / (1 << 20)


@dataclass
class StageFigure:
    label: str
    wall_s: float
    cpu_s: float
    machine_busy_s: float
    cores: int
    megabytes: float | None = None
    """Input pixels (10^6) the stage went through; None for stages that move no pixels."""
    airflow_mib: float = 0.0
    """The largest sampled RSS of the Airflow process meanwhile (every task runs in it)."""

    @property
    def utilisation(self) -> float:
        return self.cpu_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0

    @property
    def machine_utilisation(self) -> float:
        return self.machine_busy_s / (self.wall_s * self.cores) if self.wall_s > 0 else 0.0

    @property
    def mb_per_core_s(self) -> float | None:
        """MB per second per core of wall time (the stage's own cores, all busy or not)."""
        if self.megabytes is None or self.wall_s <= 0:
            return None
        return self.megabytes / (self.wall_s * self.cores)

    @property
    def mb_per_cpu_s(self) -> float | None:
        """MB per CPU second of our processes: MB/s per core kept busy, whatever the load."""
        if self.megabytes is None or self.cpu_s <= 0:
            return None
        return self.megabytes / self.cpu_s


@dataclass
class RequestFigure:
    """The requests of one endpoint of one service, from the gunicorn hooks' log."""

    service: str
    endpoint: str
    requests: int
    failed: int
    peak_mib: float
    median_peak_mib: float
    median_s: float
    median_cpu_s: float
    reset: bool
    """Each peak was reset before its request (else: the worker's peak since it started)."""


def read_request_log(path: Path) -> list[RequestFigure]:
    """Per (service, endpoint): count, non-2xx answers, largest and median peak, median time."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["path"] != "/health":
                groups.setdefault((r["service"], f"{r['method']} {r['path']}"), []).append(r)
    out = []
    for (service, endpoint), rs in sorted(groups.items()):
        peaks = [r["peak_kib"] / 1024 for r in rs]
        out.append(
            RequestFigure(
                service=service, endpoint=endpoint, requests=len(rs),
                failed=sum(not 200 <= r["status"] < 300 for r in rs),
                peak_mib=max(peaks), median_peak_mib=float(np.median(peaks)),
                median_s=float(np.median([r["end"] - r["start"] for r in rs])),
                median_cpu_s=float(np.median([r["cpu_s"] for r in rs])),
                reset=all(r["reset"] for r in rs),
            )
        )  # fmt: skip
    return out


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
    bits: int = 8
    neighbors: int = 3
    downsample: int = 2
    requests: list[RequestFigure] = field(default_factory=list)
    failed: str | None = None
    """Why the run did not finish (RunFailed's message, with the Airflow log's tail)."""

    def report(self) -> str:
        lines = [
            f"local run of {self.slices} slices of {self.size}^2 px ({self.bits}-bit), "
            f"width {self.width}, neighbours {self.neighbors}, downsample {self.downsample}",
            f"  {self.sizing}",
            "  stage             wall s   our CPU s   our CPU / cores   machine busy   MB/s per core"
            "   MB per CPU s   Airflow MiB",
        ]
        for s in self.stages:
            rate, per_cpu = s.mb_per_core_s, s.mb_per_cpu_s
            lines.append(
                f"  {s.label:<15} {s.wall_s:7.1f} {s.cpu_s:11.1f} {s.utilisation:16.0%}"
                f" {s.machine_utilisation:13.0%} {'-' if rate is None else f'{rate:.2f}':>15}"
                f" {'-' if per_cpu is None else f'{per_cpu:.2f}':>14} {s.airflow_mib:13.0f}"
            )
        lines += [
            f"  whole run (services started to complete.json): {self.wall_s:.1f} s wall, "
            f"{self.cpu_s:.1f} s CPU of our processes",
            f"  end to end: {self.megabytes:.0f} MB in, "
            f"{self.megabytes / (self.wall_s * self.cores):.2f} MB/s per core of wall time, "
            f"{self.megabytes / self.cpu_s:.2f} MB per CPU second",
        ]
        if self.requests:
            reset = all(r.reset for r in self.requests)
            lines += [
                "  requests (peak: the gunicorn worker's VmHWM over the request, "
                + ("reset before each)" if reset else "since the worker started)"),
                "  service  endpoint            requests  failed  peak MiB  median MiB"
                "  median s  median CPU s",
            ]
            for r in self.requests:
                lines.append(
                    f"  {r.service:<8} {r.endpoint:<19} {r.requests:8d} {r.failed:7d}"
                    f" {r.peak_mib:9.0f} {r.median_peak_mib:11.0f} {r.median_s:9.2f}"
                    f" {r.median_cpu_s:13.2f}"
                )
        if self.failed:
            lines.append(f"  THE RUN FAILED (no complete.json, so no stage rows): {self.failed}")
        return "\n".join(lines)


def failure_causes(workdir: Path, message: str) -> str:
    """The tasks' own failure messages from the newest Airflow run log (else ``message``'s
    first line): what a service refused, not the log's tail of tracebacks."""
    logs = sorted((workdir / "airflow").glob("run-*.log"), key=lambda p: p.stat().st_mtime)
    causes: list[str] = []
    for line in logs[-1].read_text(errors="replace").splitlines() if logs else []:
        _, found, cause = line.partition("AirflowFailException: ")
        if found and cause.strip() not in causes:
            causes.append(cause.strip())
    head = message.splitlines()[0] if message else "the run failed"
    return "; ".join([head.removesuffix(":"), *(c[:400] for c in causes[:3])])


HOOKS = Path(__file__).with_name("gunicorn_peak.py")
"""The services' gunicorn config: each request's peak memory (see its docstring)."""


def _fresh_run(conf: Any) -> None:
    """Delete the buckets of an earlier benchmark run, so nothing is taken from its caches."""
    from emprocess import storage

    for role, name in conf.layout.bucket_names().items():
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
    bits: int = 8,
    neighbors: int | None = None,
    align_max_pixels: int | None = None,
) -> RunBenchmark:
    """A real local run on a synthetic stack under ``workdir``; the stack is kept for reuse.

    Args:
        bits: 8, or 16 (slices ``v * 16 + 300``: see :mod:`emprocess_bench.bigslices`).
        neighbors: the conf's ``neighbors`` (None: its default).
        align_max_pixels: the alignment service's ``EMPROCESS_ALIGN_MAX_PIXELS`` (None:
            the environment's, else its default).
    """
    from emprocess import storage
    from emprocess.settings import StorageEnv, load

    workdir = workdir.resolve()
    chosen = load(StorageEnv, storage_root=workdir / "storage")
    with storage.use(chosen):
        return _run(
            workdir, chosen, slices, size, width, downsample, workers, threads, bits, neighbors,
            align_max_pixels,
        )  # fmt: skip


def _run(
    workdir: Path,
    chosen: StorageEnv,
    slices: int,
    size: int,
    width: int,
    downsample: int,
    workers: int | None,
    threads: int | None,
    bits: int,
    neighbors: int | None,
    align_max_pixels: int | None,
) -> RunBenchmark:
    """:func:`run_benchmark` with its storage chosen."""

    from emprocess import settings
    from emprocess.localrun import RunFailed, local_services, run_dag
    from emprocess.localsize import size_local_run
    from emprocess.workflow import WIDTHS, dag_id
    from emprocess.workflow.conf import parse_conf
    from emprocess_bench.bigslices import write_big_stack

    # A 16-bit stack is widened from the 8-bit one when a run of it left it here.
    source = SOURCE if bits == 8 else f"{SOURCE}{bits}"
    write_big_stack(source, slices, size, bits, eight_bit=SOURCE)
    fixed = width in WIDTHS
    conf = parse_conf(
        {
            "id": RUN_ID, "source": source, "image": "img.%05d.png", "minz": 0,
            "maxz": slices - 1, "downsample_factor": downsample,
            **({} if fixed else {"width": width}),
            **({} if neighbors is None else {"neighbors": neighbors}),
        }
    )  # fmt: skip
    _fresh_run(conf)
    sizing = size_local_run(workers=workers, threads=threads)
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    request_log = log_dir / "requests.jsonl"
    request_log.unlink(missing_ok=True)
    chosen_limits = {} if align_max_pixels is None else {"align_max_pixels": align_max_pixels}
    service_env = {
        **settings.environ(settings.load(settings.ServiceEnv, **chosen_limits)),
        "EMPROCESS_GUNICORN_HOOKS": str(HOOKS),  # added by emprocess.services.gunicorn_conf
        "BENCH_REQUEST_LOG": str(request_log),
    }
    t0 = time.time()
    with (
        CpuSampler() as sampler,
        local_services(
            log_dir, env=service_env, workers=sizing.service_workers(), storage_settings=chosen
        ) as services,
    ):
        try:
            doc = run_dag(
                conf, dag_id(width if fixed else None), workdir, sizing=sizing,
                services=services, storage_settings=chosen,
            )  # fmt: skip
            failed = None
        except RunFailed as e:  # the figures so far still print, and what failed
            doc, failed = {"stages": {}}, failure_causes(workdir, str(e))
        t1 = time.time()
    cpu_s, _ = sampler.between(t0, t1)
    megabytes = slices * size * size / 1e6
    moves_pixels = set(STAGES.values())
    figures = []
    for name, st in doc["stages"].items():
        s0 = datetime.fromisoformat(st["started"]).timestamp()
        s1 = datetime.fromisoformat(st["finished"]).timestamp()
        ours, busy = sampler.between(s0, s1)
        label = next((k for k, v in STAGES.items() if v == name), name.split(".")[-1])
        mb = megabytes if name in moves_pixels else None
        rss = sampler.largest_rss(s0, s1)
        figures.append(StageFigure(label, s1 - s0, ours, busy, sizing.cores, mb, rss))
    return RunBenchmark(
        slices=slices, size=size, width=width, sizing=sizing.describe(), cores=sizing.cores,
        wall_s=t1 - t0, cpu_s=cpu_s, megabytes=megabytes, stages=figures, bits=bits,
        neighbors=conf.neighbors, downsample=downsample, requests=read_request_log(request_log),
        failed=failed,
    )  # fmt: skip
