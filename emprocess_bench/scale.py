"""``emprocess bench scale``: time and peak memory of each stage that grows with the slice count.

Orchestration at the scale of a real dataset, simulated on this machine: a stack of N
tiny slices (one 64x64 PNG, stored N times) under a local storage root, and
``emprocess_bench/standin_services.py`` answering every request at once in place of both
services, so only what the DAG's own tasks do is measured: validate's listing and
header reads, the plans, each batch task's cache listing and cache writes, collect's
reads of N answers and its transforms files, finish_align's and iswritten's listings,
write_status, the report and the notebook. Each stage runs in a fresh process, as an
Airflow task does; its peak RSS is that process's high-water mark (``VmHWM``).

The fits: ``k`` is the exponent of time between the two largest counts (1 = linear);
the 50,000-slice figures extrapolate linearly through those two counts (a power law
where ``k`` is above 1.15), and memory linearly.
Optionally the real DAG runs through ``airflow dags test`` on the same stand-ins.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emprocess.settings import HttpEnv

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).with_name("standin_services.py")
NOTEBOOK = REPO / "clio_report.ipynb"
TARGET_SLICES = 50_000
LIMIT_S, LIMIT_BYTES = 600.0, 2 << 30
"""No task may take longer or more memory at TARGET_SLICES (issue 14)."""

THE_OTHERS = "the others"
SUPERLINEAR = 1.15
"""A time exponent above this (between the two largest counts) is extrapolated as a power law."""

HTTP = {"stagger_step_s": 0.0, "http_threads": 16}
"""No start stagger (the stand-ins need no scale-up); 16 request threads per batch task."""


def _source(n: int) -> str:
    return f"scale{n}"


def make_stack(n: int) -> str:
    """N copies of one 64x64 PNG as ``img.%05d.png`` in bucket ``scale{N}`` (kept for reuse)."""
    import cv2
    import numpy as np

    from emprocess import storage

    bucket = _source(n)
    storage.create_bucket(bucket)
    have = set(storage.list_keys(storage.bucket_url(bucket)))
    names = [f"img.{z:05d}.png" for z in range(n)]
    if all(name in have for name in names):
        return bucket
    img = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    png = cv2.imencode(".png", img)[1].tobytes()
    for name in names:
        if name not in have:
            storage.write_bytes(storage.bucket_url(bucket, name), png, "image/png")
    return bucket


def conf_json(n: int, run_id: str = "scale") -> dict[str, Any]:
    return {
        "id": run_id, "source": _source(n), "image": "img.%05d.png", "minz": 0,
        "maxz": n - 1, "createRawPyramid": False,
    }  # fmt: skip


def fresh_run(conf: Any) -> None:
    """Delete the run buckets of an earlier benchmark run (nothing comes from old caches)."""
    from emprocess import storage

    for role, name in conf.layout.bucket_names().items():
        if role != "source" and storage.bucket_exists(name):
            storage.delete_bucket(name, force=True)


# -- stages, each in its own process ----------------------------------------------------


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and the children it reaped."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def _in_child(stage: str, args: dict[str, Any]) -> tuple[float, float, int, int, Any]:
    """Run ``stage`` here; (seconds, CPU seconds, RSS before and peak RSS in bytes, result).

    ``args["env"]`` is this (spawned) process's settings as variables, as an Airflow task
    gets them (:func:`emprocess.settings.environ`); set before any module reads them.
    """
    os.environ.update(args["env"])
    fn = STAGE_FUNCTIONS[stage]
    before = _rss_kib("VmRSS") * 1024
    t0, c0 = time.perf_counter(), _cpu_s()
    result = fn(args)
    seconds, cpu_s = time.perf_counter() - t0, _cpu_s() - c0
    # A process it started and reaped (the notebook's kernel) counts too.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, cpu_s, before, max(_rss_kib("VmHWM"), children) * 1024, result


def _info(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import RunInfo

    return RunInfo.model_validate(a["info"])


def _validate(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import validate_run

    return validate_run(a["conf"], a["width"], a["dag_id"]).to_json()


def _plan(a: dict[str, Any]) -> Any:
    from emprocess.workflow.payloads import plan_align_pairs, plan_aligned_slices

    conf = _info(a).conf
    identity = {z: [1.0, 0.0, 0.0, 1.0, 0.0, 0.0] for z in range(conf.minz, conf.maxz + 1)}
    return len(plan_align_pairs(conf)) + len(plan_aligned_slices(conf, identity, [64, 64]))


def _workers(a: dict[str, Any], send: Callable[[Any, int], Any]) -> Any:
    info = _info(a)
    return [send(info, w) for w in a["workers"]]


def _affine(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import align_pairs

    return _workers(a, lambda info, w: align_pairs(info, w, a["url"]))


def _collect(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import collect_alignment

    return collect_alignment(_info(a))


def _create_env(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import create_env

    return create_env(_info(a), "bench")


def _write(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import write_slices

    return _workers(a, lambda info, w: write_slices(info, a["canvas"], w, a["url"]))


def _finish_align(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import check_slices_written

    return check_slices_written(_info(a), a["canvas"])


def _ngingest(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import write_ng_shards, write_ngmeta

    info = _info(a)
    write_ngmeta(info, a["canvas"], a["url"])
    return [write_ng_shards(info, a["canvas"], w, a["url"]) for w in range(info.width)]


def _iswritten(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import check_written

    ok, message = check_written(_info(a), a["canvas"])
    if not ok:
        raise RuntimeError(message)
    return message


def _write_status(a: dict[str, Any]) -> Any:
    from emprocess.workflow.stages import write_status

    info = _info(a)
    t = "2026-01-01T00:00:00.000+00:00"
    records = [
        {"task_id": f"align.{s}_{w}", "started": t, "finished": t, "batch": None}
        for s in ("affine", "write")
        for w in range(info.width)
    ]
    return write_status(info, a["canvas"], records, "bench")["elapsed_s"]


def _report(a: dict[str, Any]) -> Any:
    from emprocess.report import run_report

    info = _info(a)
    return run_report(info.conf.source, info.conf.id, a["out"]).summary_text()[:80]


def _notebook(a: dict[str, Any]) -> Any:
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    info = _info(a)
    prefix = Path(a["out"]) / "jupyter"
    install(kernel_name="python3", prefix=str(prefix))
    os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += (
        f"\nsource = {info.conf.source!r}\nrun_id = {info.conf.id!r}\n"
        f"out_dir = {str(Path(a['out']) / 'nb')!r}\n"
    )
    NotebookClient(nb, kernel_name="python3", timeout=1800).execute()
    return "executed"


STAGE_FUNCTIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "validate": _validate,
    "create_env": _create_env,
    "plan": _plan,
    "affine": _affine,
    "collect": _collect,
    "write": _write,
    "finish_align": _finish_align,
    "ngingest": _ngingest,
    "iswritten": _iswritten,
    "write_status": _write_status,
    "report": _report,
    "notebook": _notebook,
}


@dataclass
class Measure:
    seconds: float
    cpu_s: float
    """CPU seconds of the stage's process: what it costs, whatever else loads the machine."""
    rss_before: int
    peak_rss: int


@dataclass
class ScaleResult:
    """Stage -> slice count -> measure; the DAG runs' figures, if any."""

    width: int
    counts: list[int]
    stages: dict[str, dict[int, Measure]] = field(default_factory=dict)
    dag_runs: list[str] = field(default_factory=list)

    def report(self) -> str:
        mib = 1 << 20
        head = " ".join(f"{n:>23,}" for n in self.counts)
        lines = [
            f"stage wall s (CPU s) / peak RSS MiB at N slices (width {self.width}; 'one task' = "
            f"worker 0, run after the others filled the cache; '{THE_OTHERS}' = the other "
            f"{self.width - 1} batch tasks one after another in one process, not one task)",
            f"{'stage':<22}{head}    k  at {TARGET_SLICES:,}: s, MiB",
        ]
        worst = []
        for stage, by_n in self.stages.items():
            cells = " ".join(
                f"{by_n[n].seconds:8.2f} ({by_n[n].cpu_s:6.2f}) /{by_n[n].peak_rss / mib:5.0f}"
                for n in self.counts
            )
            k, t50, m50 = self.extrapolate(by_n)
            one_task = not stage.endswith(THE_OTHERS)
            flag = "  OVER LIMIT" if one_task and (t50 > LIMIT_S or m50 > LIMIT_BYTES) else ""
            lines.append(f"{stage:<22}{cells} {k:4.2f}  {t50:8.1f}, {m50 / mib:5.0f}{flag}")
            if one_task:
                worst.append((t50, m50))
        if worst:
            lines.append(
                f"largest at {TARGET_SLICES:,} slices: {max(w[0] for w in worst):.0f} s, "
                f"{max(w[1] for w in worst) / mib:.0f} MiB per task "
                f"(limits {LIMIT_S:.0f} s, {LIMIT_BYTES / mib:.0f} MiB)"
            )
        return "\n".join(lines + self.dag_runs)

    def extrapolate(self, by_n: dict[int, Measure]) -> tuple[float, float, float]:
        """(time exponent k, seconds and peak bytes at TARGET_SLICES)."""
        ns = sorted(by_n)
        a, b = ns[-2] if len(ns) > 1 else ns[-1], ns[-1]
        ta, tb = max(by_n[a].seconds, 1e-3), max(by_n[b].seconds, 1e-3)
        k = math.log(tb / ta) / math.log(b / a) if b != a else 1.0
        if k > SUPERLINEAR:  # grows faster than linearly: follow the power law
            t50 = tb * (TARGET_SLICES / b) ** k
        else:  # a fixed cost plus a linear part, through the two largest counts
            t50 = tb + max(tb - ta, 0.0) / (b - a) * (TARGET_SLICES - b) if b != a else tb
        slope = (by_n[b].peak_rss - by_n[a].peak_rss) / (b - a) if b != a else 0.0
        m50 = by_n[b].peak_rss + max(slope, 0.0) * (TARGET_SLICES - b)
        return k, t50, m50


def _start_standin(log_file: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    from emprocess.localrun import free_port, wait_http

    if not STANDIN.is_file():
        raise FileNotFoundError(f"{STANDIN} is missing: run the benchmark from a checkout")
    port = free_port()
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, str(STANDIN), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=proc)
    return proc, url


def run_scale_benchmark(
    workdir: Path,
    counts: tuple[int, ...] = (5000, 10000, 20000),
    width: int = 32,
    dag_counts: tuple[int, ...] = (),
    notebook: bool = True,
    on_line: Callable[[str], None] = lambda line: None,
) -> ScaleResult:
    """Measure the stages at each count; then run the real DAG at each of ``dag_counts``."""
    from emprocess import settings, storage
    from emprocess.localrun import stop_process
    from emprocess.settings import HttpEnv, StorageEnv, load
    from emprocess.workflow import dag_id
    from emprocess.workflow.conf import parse_conf

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # The benchmark's own storage, whatever the command's (emprocess --storage-root) was;
    # the stage processes and the stand-ins get it, and the HTTP settings, as variables.
    chosen = load(StorageEnv, storage_root=workdir / "storage")
    http = load(HttpEnv, **HTTP)
    env = settings.environ(http, chosen)
    result = ScaleResult(width=width, counts=list(counts))
    proc, url = _start_standin(workdir / "standin.log", env)
    with ExitStack() as here:
        here.callback(stop_process, proc)
        here.enter_context(storage.use(chosen))
        for n in counts:
            on_line(f"{n} slices: writing the stack ...")
            make_stack(n)
            conf = parse_conf(conf_json(n))
            fresh_run(conf)
            args: dict[str, Any] = {
                "env": env, "conf": conf_json(n), "dag_id": dag_id(None), "width": None,
                "url": url, "out": str(workdir / f"report{n}"),
            }  # fmt: skip
            args["conf"]["width"] = width
            others = list(range(1, width))
            plan: list[tuple[str, str, dict[str, Any]]] = [
                ("validate", "validate", {}),
                ("create_env", "create_env", {}),
                ("plan", "plan", {}),
                ("affine", "affine, the others", {"workers": others}),
                ("affine", "affine, one task", {"workers": [0]}),
                ("collect", "collect", {}),
                ("write", "write, the others", {"workers": others}),
                ("write", "write, one task", {"workers": [0]}),
                ("finish_align", "finish_align", {}),
                ("ngingest", "ngmeta + shards", {}),
                ("iswritten", "iswritten", {}),
                ("write_status", "write_status", {}),
                ("report", "report", {}),
            ]
            if notebook:
                plan.append(("notebook", "notebook", {}))
            for stage, label, extra in plan:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    secs, cpu_s, before, peak, out = pool.submit(
                        _in_child, stage, {**args, **extra}
                    ).result()
                if stage == "validate":
                    args["info"] = out
                elif stage == "collect":
                    args["canvas"] = out
                result.stages.setdefault(label, {})[n] = Measure(secs, cpu_s, before, peak)
                on_line(
                    f"{n} slices: {label} {secs:.2f} s ({cpu_s:.2f} s CPU), peak {peak >> 20} MiB"
                )
        for n in dag_counts:
            result.dag_runs.append(run_dag_simulated(workdir, n, width, url, on_line, http))
    return result


def run_dag_simulated(
    workdir: Path,
    n: int,
    width: int,
    url: str,
    on_line: Callable[[str], None],
    http: HttpEnv | None = None,
) -> str:
    """The real DAG through ``airflow dags test`` on N tiny slices and the stand-ins."""
    import psutil

    from emprocess.localrun import RunProgress, Services, run_dag
    from emprocess.localsize import size_local_run
    from emprocess.workflow import WIDTHS, dag_id
    from emprocess.workflow.conf import parse_conf

    make_stack(n)
    data = conf_json(n, run_id="scaledag")
    fixed = width in WIDTHS
    if not fixed:
        data["width"] = width
    conf = parse_conf(data)
    fresh_run(conf)
    samples: list[tuple[float, int]] = []  # (time, RSS of the largest process)
    me = psutil.Process()
    standin = {p.pid for p in me.children() if str(STANDIN) in " ".join(p.cmdline())}
    t0 = time.monotonic()

    done = threading.Event()

    def watch() -> None:  # the largest process: `dags test` runs every task in one
        while not done.wait(0.5):
            rss = 0
            for p in me.children(recursive=True):
                try:
                    if p.pid not in standin:
                        rss = max(rss, p.memory_info().rss)
                except psutil.Error:
                    continue
            samples.append((time.time(), rss))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with RunProgress(conf.source, conf.id) as progress:
            doc = run_dag(
                conf, dag_id(width if fixed else None), workdir / f"dag{n}",
                progress=progress, poll_s=2.0,
                sizing=size_local_run(threads=16), services=Services(align=url, emwrite=url),
                http_settings=http,
            )  # fmt: skip
    finally:
        done.set()
        watcher.join()
    wall = time.monotonic() - t0
    peak = max((rss for _, rss in samples), default=0)

    def stage_mib(st: dict[str, Any]) -> int:
        """The largest process's peak RSS while the stage ran (its high-water mark)."""
        s0, s1 = (datetime.fromisoformat(st[k]).timestamp() for k in ("started", "finished"))
        inside = [rss for t, rss in samples if s0 - 0.5 <= t <= s1 + 0.5]
        return max(inside, default=0) >> 20

    stages = ", ".join(
        f"{name.split('.')[-1]} {st['elapsed_s']:.0f} s / {stage_mib(st)} MiB"
        for name, st in doc["stages"].items()
    )
    return (
        f"real DAG {doc['dag_id']} (airflow dags test) on {n:,} slices: {wall:.0f} s in all, "
        f"largest process {peak >> 20} MiB; stages (wall / that process's peak RSS meanwhile): "
        f"{stages}"
    )
