"""The ``emprocess`` command: sample data, local services, benchmarks and runs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from emprocess import __version__, cli_airflow
from emprocess.cli_options import (
    INTENSITY,
    RAW,
    RESOLUTION,
    conf_help,
    conf_option,
    numbers,
    with_every_conf_key,
)

if TYPE_CHECKING:
    from pathlib import Path

    from emprocess.settings import StorageEnv
    from emprocess.workflow.conf import RunConf

app = typer.Typer(
    help="Turn FIB-SEM image stacks into aligned, multiscale neuroglancer volumes.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"emprocess {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    storage_root: str = typer.Option(
        None,
        "--storage-root",
        help="Local folder standing in for Google Cloud Storage (gs://B/K is ROOT/B/K); "
        "default: EMPROCESS_STORAGE_ROOT, and unset, Google Cloud Storage.",
        show_default=False,
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from emprocess import storage

    # Read once, for the whole command; services and Airflow processes it starts get the
    # same settings as variables (emprocess.settings.environ).
    chosen = _storage_settings(storage_root=storage_root) if storage_root else None
    ctx.with_resource(storage.use(chosen or _storage_settings()))


def _storage_settings(**chosen: Any) -> StorageEnv:
    """The environment's storage settings with the fields in ``chosen`` replaced; a bad
    value stops the command with the variable's name."""
    from emprocess.errors import InvalidInput
    from emprocess.settings import StorageEnv, load

    try:
        return load(StorageEnv, **chosen)
    except InvalidInput as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def sample(
    dest: str = typer.Argument(
        ..., help="Where to write: a folder, file:///abs/path, or gs://BUCKET/PREFIX."
    ),
    slices: int = typer.Option(64, "--slices", "-n", min=1, help="Number of slices."),
    size: tuple[int, int] = typer.Option((1024, 1024), help="Slice WIDTH HEIGHT in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same bytes."),
    first_z: int = typer.Option(0, "--first-z", min=0, help="Number of the first slice."),
    image: str = typer.Option("img.%05d.png", help="printf template of the slice names."),
) -> None:
    """Write a synthetic FIB-SEM-like stack with known drift, and its truth.json."""
    from emprocess.errors import EmprocessError
    from emprocess.sample import write_sample

    try:
        truth = write_sample(
            dest, slices, size[0], size[1], seed=seed, first_z=first_z, template=image
        )
    except EmprocessError as e:
        raise typer.BadParameter(str(e)) from None
    print(
        f"wrote {slices} slices {truth['image']} z={truth['minz']}..{truth['maxz']} "
        f"({size[0]}x{size[1]}) and truth.json to {dest}"
    )


WORKERS_HELP = "gunicorn workers of each service (default: one per core, as memory allows)."
THREADS_HELP = "Request threads per batch task (default: twice the service workers)."

BENCH_EXTRA = "pip install -e '.[bench]' in a checkout of the repository"


class _BenchGroup(TyperGroup):
    """``emprocess bench``: says which extra to install when a benchmark cannot import.

    The benchmarks live in the top-level ``benchmarks`` package of the repository (not
    in the images of the services or in Composer), their dependencies in the ``bench``
    extra.
    """

    def invoke(self, ctx: Any) -> Any:  # click.Context, vendored by some typer versions
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            typer.echo(
                f"error: emprocess bench needs {e.name}, which comes with the benchmarks "
                f"package and its [bench] extra: {BENCH_EXTRA}",
                err=True,
            )
            raise typer.Exit(1) from None


bench_app = typer.Typer(
    cls=_BenchGroup, help="Benchmarks that print figures (speed, memory).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@bench_app.command("align")
def bench_align(
    sizes: list[int] = typer.Option([2048, 8192], "--size", help="Square image side(s) in px."),
    downsamples: list[int] = typer.Option([1, 2, 4], "--downsample", help="Downsample factor(s)."),
    repeats: int = typer.Option(3, min=1, help="Runs per case; the fastest is reported."),
) -> None:
    """Seconds of wall and CPU per pair, on one core, with the recovered error in px."""
    import cv2

    from emprocess_bench.align import print_align_benchmark, run_align_benchmark

    cv2.setNumThreads(1)
    print_align_benchmark(run_align_benchmark(tuple(sizes), tuple(downsamples), repeats))


@bench_app.command("neighbors")
def bench_neighbors(
    slices: int = typer.Option(16, min=2, help="Slices of the synthetic stack."),
    size: int = typer.Option(2048, min=64, help="Side of each slice in px."),
    neighbors: list[int] = typer.Option([1, 3, 6], help="Neighbour counts (conf neighbors)."),
    downsample: int = typer.Option(1, min=1, max=64, help="Alignment downsample factor."),
) -> None:
    """Align CPU per neighbour count: pairs decoding both slices vs features once per slice."""
    import cv2

    from emprocess_bench.neighbors import print_neighbors_benchmark, run_neighbors_benchmark

    cv2.setNumThreads(1)
    services = logging.getLogger("emprocess.services")
    level = services.level
    services.setLevel(logging.WARNING)  # not one line per pair
    try:
        rows = run_neighbors_benchmark(slices, size, tuple(neighbors), downsample)
    finally:
        services.setLevel(level)
    print_neighbors_benchmark(rows)


@bench_app.command("align-service")
def bench_align_service(
    sizes: list[int] = typer.Option([20000], "--size", help="Square slice side(s) in px."),
    bits: list[int] = typer.Option([8, 16], "--bits", help="8 and/or 16."),
    downsample: int = typer.Option(4, min=1, help="The request's downsample factor."),
    max_pixels: int = typer.Option(0, help="EMPROCESS_ALIGN_MAX_PIXELS (0: the default)."),
) -> None:
    """Peak RSS and wall time of one alignment request of a big pair, through the service."""
    from emprocess_bench.align_service import (
        print_align_service_benchmark,
        run_align_service_benchmark,
    )

    if any(b not in (8, 16) for b in bits):
        raise typer.BadParameter(f"--bits must be 8 or 16, got {bits}")
    rows = [
        run_align_service_benchmark(size, b, downsample, max_pixels or None)
        for size in sizes
        for b in bits
    ]
    print_align_service_benchmark(rows)


@bench_app.command("emwrite")
def bench_emwrite(
    slices: int = typer.Option(64, min=0, help="Slices of the synthetic stack (0: none)."),
    size: int = typer.Option(2048, min=64, help="Side of each slice in px."),
    raw: bool = typer.Option(True, help="Also /ngshard with the lossless pyramid."),
    repeats: int = typer.Option(3, min=1, help="Fresh runs per phase; the fastest counts."),
    slice_px: int = typer.Option(0, help="Also one /alignedslice of this side (peak RSS)."),
    cube: bool = typer.Option(False, help="Also one full 1024^3 /ngshard cube (peak RSS)."),
    bits: int = typer.Option(
        8, help="8, or 16: the stack as 16-bit slices (v * 16 + 300) sent with a window."
    ),
    raw_bits: int = typer.Option(8, help="16 (with --bits 16): a uint16 lossless volume."),
    channels: int = typer.Option(
        1, help="1, or 3: RGB slices kept in 3 channels (MB counted in pixels, as for grey)."
    ),
) -> None:
    """MB/s per core and peak RSS of every emwrite endpoint, end to end.

    Storage: the local root of --storage-root or EMPROCESS_STORAGE_ROOT (objects kept),
    else a temporary folder (removed after).
    """
    from emprocess import storage
    from emprocess_bench.emwrite import print_emwrite_benchmark, run_emwrite_benchmark

    if bits not in (8, 16) or raw_bits not in (8, bits):
        raise typer.BadParameter(
            f"--bits must be 8 or 16 and --raw-bits 8 or --bits, got {bits} and {raw_bits}"
        )
    if channels not in (1, 3) or (channels == 3 and raw_bits == 16):
        raise typer.BadParameter(f"--channels must be 1 or 3 (3 with --raw-bits 8), got {channels}")
    print_emwrite_benchmark(
        run_emwrite_benchmark(
            slices,
            size,
            raw,
            repeats=repeats,
            slice_px=slice_px,
            cube=cube,
            bits=bits,
            raw_bits=raw_bits,
            channels=channels,
            root=None if storage.local_root() is None else str(storage.local_root()),
        )
    )


@bench_app.command("memory")
def bench_memory(
    slice_case: list[str] = typer.Option(
        ["20000:8", "20000:16", "32766:8"],
        "--slice",
        help="SIDE:BITS of an /alignedslice (16-bit with a window); repeat for more.",
    ),
    cube_channels: int = typer.Option(
        4, min=0, help="Channels of one /ngshard cube (jpeg_channels each + raw); 0: none."
    ),
    cube_depth: int = typer.Option(1024, min=1, max=1024, help="Slices of that cube."),
    code: str = typer.Option("", help="Serve the emprocess of this checkout (before/after)."),
    data_dir: str = typer.Option(
        "", help="Keep the slices made here and reuse them next time (never in the repo)."
    ),
) -> None:
    """Wall time and the emwrite worker's peak memory (VmHWM) of each request."""
    from pathlib import Path

    from emprocess_bench.memory import parse_case, run_memory_benchmark

    try:
        cases = [parse_case(c) for c in slice_case]
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run_memory_benchmark(
        cases,
        cube_channels,
        cube_depth,
        Path(code).resolve() if code else None,
        Path(data_dir).resolve() if data_dir else None,
    )


@bench_app.command("solve")
def bench_solve(
    sizes: list[int] = typer.Option([1000, 10_000, 50_000], "--slices", help="Stack sizes."),
    neighbors: int = typer.Option(4, min=1, max=6, help="Neighbours per slice."),
) -> None:
    """Time and peak memory of collect's global solve (targets at 50,000: < 60 s, < 2 GiB)."""
    from emprocess_bench.solve import print_solve_benchmark, run_solve_benchmark

    print_solve_benchmark(run_solve_benchmark(sizes, neighbors))


@bench_app.command("drift")
def bench_drift(
    folder: str = typer.Option(
        "../shared/data/fibsem", help="Folder of registered slices img.NNNNN.png (real FIB-SEM)."
    ),
    slices: int = typer.Option(100, min=10, help="Stack length (longer runs the folder back)."),
    crop: int = typer.Option(440, min=64, help="Side of the resliced slices (px)."),
    downsample: int = typer.Option(1, min=1, max=8, help="Alignment downsample factor."),
    neighbors: list[int] = typer.Option([2, 3], help="Neighbours of the solve runs."),
    regularization: float = typer.Option(
        10.0, min=0.0, max=100.0, help="Pull toward rigid (the conf's default)."
    ),
    faults: bool = typer.Option(True, help="Inject blank, noise, 2-in-a-row and duplicate."),
    answers: str | None = typer.Option(
        None, help="JSON file keeping the pair answers: written when missing, else reused."
    ),
    gap_round: bool = typer.Option(
        True, help="collect's second align round: pairs across runs of bad slices."
    ),
) -> None:
    """Accuracy on real FIB-SEM resliced with known drift: today's chain vs the global solve."""
    from pathlib import Path

    from emprocess_bench.drift import print_drift_benchmark, run_drift_benchmark

    rows = run_drift_benchmark(
        Path(folder),
        slices,
        crop,
        downsample,
        tuple(neighbors),
        regularization,
        faults,
        answers_file=None if answers is None else Path(answers),
        gap_round=gap_round,
    )
    print_drift_benchmark(rows, slices, downsample)


@bench_app.command("corrections")
def bench_corrections(
    folder: str = typer.Option(
        "../shared/data/fibsem", help="Folder of registered slices img.NNNNN.png (real FIB-SEM)."
    ),
    slices: int = typer.Option(100, min=2, help="Slices of the folder used (the first ones)."),
    bits: int = typer.Option(8, min=8, max=16, help="8, or 16 (the slices x 257)."),
    gain: float = typer.Option(0.1, min=0.0, max=0.5, help="Flicker gain: 1 +- this."),
    offset: float = typer.Option(10.0, min=0.0, max=60.0, help="Flicker offset: +- grey levels."),
    stripe: float = typer.Option(12.0, min=0.0, max=60.0, help="Stripes' std, grey levels."),
    seed: int = typer.Option(0, help="Seed of the injected faults."),
    big: int = typer.Option(
        0, min=0, max=32768, help="Also time destreaking one slice this many px square (0: no)."
    ),
) -> None:
    """Destreaking and per-slice normalisation on real FIB-SEM with known faults vs the clean stack."""
    from pathlib import Path

    from emprocess_bench.corrections import (
        Faults,
        print_corrections_benchmark,
        run_corrections_benchmark,
    )

    if bits not in (8, 16):
        raise typer.BadParameter(f"bits must be 8 or 16, got {bits}")
    rows = run_corrections_benchmark(
        Path(folder), slices, Faults(gain, offset, stripe, seed), bits=bits
    )
    print_corrections_benchmark(rows, slices, bits)
    if big:
        from emprocess_bench.corrections import destreak_cost, print_destreak_cost

        print_destreak_cost(destreak_cost(Path(folder), big, bits))


@bench_app.command("run")
def bench_run(
    workdir: str = typer.Option("work-bench", help="Folder for the stack, Airflow and logs."),
    slices: int = typer.Option(64, min=2, help="Slices of the synthetic stack."),
    size: int = typer.Option(2048, min=64, help="Side of the square slices in px."),
    width: int = typer.Option(4, min=1, help="DAG width."),
    downsample: int = typer.Option(2, min=1, help="Alignment downsample factor."),
    workers: int = typer.Option(None, min=1, help=WORKERS_HELP),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
    bits: int = typer.Option(8, help="8, or 16: 16-bit slices (v * 16 + 300)."),
    neighbors: int = typer.Option(None, min=1, help="The conf's neighbors (default: its own)."),
    align_max_pixels: int = typer.Option(
        None, min=1, help="EMPROCESS_ALIGN_MAX_PIXELS of the alignment service for this run."
    ),
) -> None:
    """A real local run: wall, CPU and MB/s per core of every stage, peak memory per request.

    Utilisation is the CPU time of the processes the run started (services, Airflow)
    over each stage's wall time times the cores, so other load on the machine does not
    count as ours; the machine's busy share is printed beside it. Each request's peak is
    its gunicorn worker's VmHWM, reset before the request (emprocess_bench/gunicorn_peak.py).
    Slices above 8192 px are the synthetic slices enlarged (emprocess_bench/bigslices.py);
    at 20,000 px run it under `flock /work/bigmem.lock` on a shared machine.
    """
    from pathlib import Path

    from emprocess_bench.run import run_benchmark

    if bits not in (8, 16):
        raise typer.BadParameter(f"--bits must be 8 or 16, got {bits}")
    logging.getLogger("emprocess.report").setLevel(logging.WARNING)
    result = run_benchmark(
        Path(workdir), slices=slices, size=size, width=width, downsample=downsample,
        workers=workers, threads=threads, bits=bits, neighbors=neighbors,
        align_max_pixels=align_max_pixels,
    )  # fmt: skip
    print(result.report())
    if result.failed:
        raise typer.Exit(1)


@bench_app.command("scale")
def bench_scale(
    workdir: str = typer.Option("work-scale", help="Folder for the stacks, Airflow and logs."),
    counts: list[int] = typer.Option([5000, 10000, 20000], "--slices", help="Slice counts."),
    width: int = typer.Option(32, min=1, help="DAG width (batch tasks per stage)."),
    dag: list[int] = typer.Option(
        [], "--dag-slices", help="Also run the real DAG (airflow dags test) at these counts."
    ),
    notebook: bool = typer.Option(True, help="Also execute clio_report.ipynb."),
) -> None:
    """Time and peak RSS of every stage that grows with the slice count, extrapolated to 50,000.

    Tiny slices and stand-in services (emprocess_bench/standin_services.py) that answer at
    once: only the DAG's own work is measured, each stage in a fresh process.
    """
    from pathlib import Path

    from emprocess_bench.scale import run_scale_benchmark

    logging.getLogger("emprocess").setLevel(logging.WARNING)
    result = run_scale_benchmark(
        Path(workdir), tuple(sorted(counts)), width, tuple(dag), notebook,
        on_line=lambda line: print(line, flush=True),
    )  # fmt: skip
    print(result.report())


@bench_app.command("plan")
def bench_plan(
    terabytes: float = typer.Option(10.0, min=0.001, help="Dataset size in TB (8-bit)."),
    side: int = typer.Option(20_000, min=1024, help="Side of the square slices in px."),
    neighbors: int = typer.Option(3, min=1, help="Alignment pairs per slice (conf neighbors)."),
) -> None:
    """Requests, objects, GCS rates, Cloud Run time and cost of a large run (docs/scale.md).

    Arithmetic from the measured throughput and stated prices (constants in
    emprocess_bench/plan.py, each with its source).
    """
    from emprocess_bench.plan import make_plan, report

    print(report(make_plan(terabytes * 1e12, side, neighbors)))


@bench_app.command("parse")
def bench_parse(repeats: int = typer.Option(5, min=1, help="Parses; the median counts.")) -> None:
    """Seconds Airflow takes to parse emprocess.py (all DAGs); target under 1 s."""
    from emprocess_bench.parse import bench_parse as run

    print(run(repeats=repeats).report())


SERVE_TIMEOUT_S = 900
"""gunicorn's worker timeout, here and in the containers: a stuck worker is restarted."""

WORKER_CLASS = "emprocess.services.worker.DeadlineSyncWorker"
"""gunicorn's sync worker that runs a request once received, here and in the containers."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

SERVICES = {
    "align": "emprocess.services.align:create_app()",
    "emwrite": "emprocess.services.emwrite:create_app()",
}


MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial value, kept fixed (the containers set it too)


@app.command()
def serve(
    service: str = typer.Argument(..., help="Which service: align or emwrite."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps it local."),
    port: int = typer.Option(8080, min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, help="gunicorn worker processes."),
    threads: int = typer.Option(1, min=1, help="Threads per worker (Cloud Run: 1)."),
    timeout: int = typer.Option(
        SERVE_TIMEOUT_S, min=0, help="Seconds a request may take; 0 = no limit."
    ),
) -> None:
    """Run a service under gunicorn, as its container does (one worker, one request at a time).

    A request runs once it has arrived, within 10 s of its connection (a slow client
    cannot hold the worker); on a loopback address the service answers only a loopback Host
    (EMPROCESS_ALLOWED_HOSTS), so a web page cannot reach it by DNS rebinding.
    """
    import os
    import shutil
    import sys

    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose from {sorted(SERVICES)}")
    _require_service_extra(service)
    # As in the containers: glibc's per-thread malloc arenas strand the buffers that
    # tensorstore's threads free, which nearly doubles the peak RSS of /ngshard.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    # And a fixed mmap threshold: glibc raises it (up to 32 MiB) as large blocks are
    # freed, after which tensorstore's chunk buffers stay in the heap once freed; an
    # RGB 1024^3 /ngshard cube peaked 13% higher (1.97 against 1.74 GiB).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES))
    if host in LOCAL_HOSTS:  # only local names in Host: no DNS rebinding from a web page
        os.environ.setdefault("EMPROCESS_ALLOWED_HOSTS", ",".join(LOCAL_HOSTS))
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    argv = [
        gunicorn,
        "--config", GUNICORN_CONFIG,
        "--bind", f"{host}:{port}",
        "--workers", str(workers),
        "--threads", str(threads),
        "--timeout", str(timeout),
        # More threads: gunicorn's gthread worker (which it picks itself for a plain sync).
        "--worker-class", WORKER_CLASS if threads == 1 else "gthread",
        SERVICES[service],
    ]  # fmt: skip
    os.execv(gunicorn, argv) if os.path.isabs(gunicorn) else os.execvp(gunicorn, argv)


GUNICORN_CONFIG = "python:emprocess.services.gunicorn_conf"
"""Its workers stop when their master is killed (no orphan keeps the port)."""
SERVICE_MODULES = {"align": ("flask", "gunicorn"), "emwrite": ("flask", "gunicorn", "tensorstore")}


def _require_service_extra(service: str) -> None:
    """Stop with the extra to install when the service's packages are missing."""
    import importlib.util

    missing = [m for m in SERVICE_MODULES[service] if importlib.util.find_spec(m) is None]
    if missing:
        typer.echo(
            f"error: emprocess serve {service} needs {', '.join(missing)}: "
            f"pip install -e '.[{service}]' (or '.[airflow-server]' for everything the "
            "self-managed Airflow needs)",
            err=True,
        )
        raise typer.Exit(1)


def _storage_for(source: str) -> tuple[str, StorageEnv]:
    """The bucket and storage of ``emprocess run SOURCE``.

    A folder SOURCE means: its parent is the storage root and its name the bucket; a
    bucket name keeps the command's storage (``--storage-root``, the environment).
    """
    from pathlib import Path

    from emprocess import storage

    if "/" not in source and not Path(source).is_dir():
        return source, storage.settings()
    folder = Path(source).expanduser().resolve()
    if not folder.is_dir():
        raise typer.BadParameter(f"{source!r} is not a folder")
    storage.check_bucket_name(folder.name)
    return folder.name, _storage_settings(storage_root=folder.parent)


def _build_conf(**values: object) -> RunConf:
    from emprocess.errors import InvalidInput
    from emprocess.workflow.conf import parse_conf

    try:
        return parse_conf({k: v for k, v in values.items() if v is not None})
    except InvalidInput as e:
        raise typer.BadParameter(str(e)) from None


def _dag_for(width: int) -> tuple[str, int | None]:
    from emprocess.workflow import WIDTHS, dag_id

    return (dag_id(width), None) if width in WIDTHS else (dag_id(None), width)


@app.command()
@with_every_conf_key
def run(
    source: str = typer.Argument(
        ..., help="Folder of slices (its parent becomes the storage root) or a bucket name."
    ),
    image: str = conf_option("image"),
    minz: int = conf_option("minz"),
    maxz: int = conf_option("maxz"),
    run_id: str = conf_option("id", "--id", default=None, note=" Default: SOURCE-run."),
    raw: bool = RAW,
    resolution: str = RESOLUTION,
    intensity: str = INTENSITY,
    width: int = typer.Option(
        None,
        min=1,
        help="Concurrent batch workers per stage (DAG width). Default 1 under `dags test`, "
        "whose tasks run one after another (the request threads fill the workers), 4 with "
        "--scheduler.",
    ),
    workdir: str = typer.Option("work", help="Folder for Airflow's home, database and logs."),
    scheduler: bool = typer.Option(
        False,
        help="Run it as Composer does: a real api-server, scheduler and dag-processor "
        "(LocalExecutor), triggered through the REST API, instead of `airflow dags test`.",
    ),
    db_url: str = typer.Option(
        None, "--db-url", help="With --scheduler: metadata database URL (default SQLite)."
    ),
    workers: int = typer.Option(None, min=1, help=WORKERS_HELP),
    threads: int = typer.Option(None, min=1, help=THREADS_HELP),
    more_conf: dict[str, Any] | None = None,
) -> None:
    """Run the whole workflow here: services under gunicorn, the DAG through real Airflow.

    Each service gets a gunicorn worker per core (fewer when memory is short: an emwrite
    worker needs up to 1.1 GiB, an alignment worker 0.5 GiB), and each batch task sends
    its requests over twice as many threads, so the align and write stages use every core.
    """
    import time
    from pathlib import Path

    from emprocess import storage
    from emprocess.errors import EmprocessError
    from emprocess.localrun import RunProgress, run_dag
    from emprocess.localsize import size_local_run

    bucket, chosen = _storage_for(source)
    if width is None:
        width = 4 if scheduler else 1
    dag, conf_width = _dag_for(width)
    conf = _build_conf(
        id=run_id or f"{bucket}-run", image=image, minz=minz, maxz=maxz, source=bucket,
        createRawPyramid=raw, resolution=numbers(resolution, "resolution"),
        intensity=numbers(intensity, "intensity"), width=conf_width, **(more_conf or {}),
    )  # fmt: skip
    t0 = time.monotonic()
    sizing = size_local_run(workers=workers, threads=threads)
    print(f"local run: {sizing.describe()}", flush=True)
    with storage.use(chosen):
        try:
            with RunProgress(conf.source, conf.id) as progress:
                if scheduler:
                    from emprocess.airflowserver import run_with_scheduler

                    logging.getLogger("emprocess.report").setLevel(logging.WARNING)
                    doc = run_with_scheduler(
                        conf, dag, width, Path(workdir).resolve(), db_url=db_url,
                        progress=progress, workers=sizing.service_workers(),
                        storage_settings=chosen,
                    )  # fmt: skip
                else:
                    doc = run_dag(
                        conf, dag, Path(workdir).resolve(), sizing=sizing, progress=progress,
                        storage_settings=chosen,
                    )  # fmt: skip
        except EmprocessError as e:
            print(f"run failed: {e}")
            raise typer.Exit(1) from None
        _print_outcome(conf, doc, time.monotonic() - t0)


@app.command()
@with_every_conf_key
def trigger(
    source: str = typer.Argument(None, help=conf_help("source") + " (Or in --conf.)"),
    image: str = conf_option("image", default=None),
    minz: int = conf_option("minz", default=None),
    maxz: int = conf_option("maxz", default=None),
    run_id: str = conf_option("id", "--id", default=None),
    width: int = typer.Option(
        None,
        min=1,
        help="DAG width: a fixed DAG for 1, 4, 32, 64, 128, else the dynamic one. Default: "
        "the --conf's width, else 4.",
        show_default=False,
    ),
    raw: bool = RAW,
    resolution: str = RESOLUTION,
    intensity: str = INTENSITY,
    conf_json: str = typer.Option(
        None,
        "--conf",
        help="Send this whole conf (JSON text, or @FILE) instead of building one from the "
        "options, with its own keys (legacy ones such as mail too); checked by the schema "
        "first. Only --width is taken from the options.",
    ),
    composer_env: str = typer.Option(
        None, "--composer-env", help="Cloud Composer environment name."
    ),
    location: str = typer.Option(None, help="Composer environment location (region)."),
    api_url: str = typer.Option(
        None, "--api-url", help="Airflow REST API base URL, instead of Composer."
    ),
    token: str = typer.Option(None, envvar="AIRFLOW_API_TOKEN", help="Bearer token for --api-url."),
    username: str = typer.Option(
        None, envvar="AIRFLOW_USERNAME", help="Get a token with POST /auth/token as this user."
    ),
    password: str = typer.Option(
        None, envvar="AIRFLOW_PASSWORD", help="Password of --username.", show_default=False
    ),
    check: bool = typer.Option(
        True,
        help="Before sending, check that the DAG exists and is unpaused, the pool "
        "http_requests has at least WIDTH slots and Airflow lets the DAG run WIDTH tasks.",
    ),
    unpause: bool = typer.Option(False, help="Unpause the DAG if it is paused."),
    wait: bool = typer.Option(
        False, help="Follow the run to its end with per-stage progress, then print its report."
    ),
    poll_s: float = typer.Option(2.0, "--poll-s", min=0.1, help="Seconds between polls (--wait)."),
    timeout_s: float = typer.Option(
        None, "--timeout-s", min=1, help="Give up waiting after this many seconds."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what would be sent; send nothing."
    ),
    attach: str = typer.Option(
        None,
        "--attach",
        metavar="RUN_ID",
        help="Trigger nothing: follow the run RUN_ID (started elsewhere) as --wait does.",
    ),
    retry_s: float = cli_airflow.RETRY_S_OPTION,
    more_conf: dict[str, Any] | None = None,
) -> None:
    """Trigger a run on Cloud Composer (gcloud) or an Airflow REST API, conf checked first."""
    import json
    import shlex

    from emprocess import trigger as trig
    from emprocess.errors import EmprocessError

    if attach:
        _attach(attach, width, api_url, token, username, password, poll_s, timeout_s, retry_s)
        return
    if bool(composer_env) == bool(api_url):
        raise typer.BadParameter("give either --composer-env with --location, or --api-url")
    if composer_env and not location:
        raise typer.BadParameter("--composer-env needs --location")
    if wait and not api_url:
        raise typer.BadParameter("--wait needs --api-url")
    if conf_json and more_conf:
        options = ", ".join("--" + k.replace("_", "-") for k in more_conf)
        raise typer.BadParameter(f"--conf holds the whole conf; give {options} in it instead")
    if conf_json:
        conf = _read_conf_json(conf_json)
        parsed = _build_conf(**conf)
        dag, conf_width = _dag_for(parsed.width or width or TRIGGER_WIDTH)
        if conf_width is not None and "width" not in conf:
            conf["width"] = conf_width
    else:
        missing = [name for name, v in (("SOURCE", source), ("--image", image), ("--minz", minz),
                   ("--maxz", maxz), ("--id", run_id)) if v is None]  # fmt: skip
        if missing:
            raise typer.BadParameter(f"missing {', '.join(missing)} (or give --conf)")
        dag, conf_width = _dag_for(width or TRIGGER_WIDTH)
        parsed = _build_conf(
            id=run_id, image=image, minz=minz, maxz=maxz, source=source, createRawPyramid=raw,
            resolution=numbers(resolution, "resolution"),
            intensity=numbers(intensity, "intensity"), width=conf_width, **(more_conf or {}),
        )  # fmt: skip
        conf = parsed.to_json()
    run_width = parsed.width or width or TRIGGER_WIDTH
    try:
        if composer_env:
            command = trig.composer_command(composer_env, location, dag, parsed.id, conf)
            if dry_run:
                print(shlex.join(command))
                return
            print(trig.trigger_composer(command))
            return
        url, body = trig.rest_request(api_url, dag, parsed.id, conf)
        if dry_run:
            print(f"POST {url}\n{json.dumps(body, indent=2)}")
            return
        _trigger_rest(
            api_url, token, username, password, dag, parsed, conf, run_width,
            check=check, unpause=unpause, wait=wait, poll_s=poll_s, timeout_s=timeout_s,
            retry_s=retry_s,
        )  # fmt: skip
    except EmprocessError as e:
        print(f"trigger failed: {e}")
        raise typer.Exit(1) from None


def _read_conf_json(text: str) -> dict:
    import json
    from pathlib import Path

    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        conf = json.loads(text)
    except ValueError as e:
        raise typer.BadParameter(f"--conf is not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise typer.BadParameter(f"--conf must be a JSON object, got {type(conf).__name__}")
    return conf


def _trigger_rest(
    api_url: str,
    token: str | None,
    username: str | None,
    password: str | None,
    dag: str,
    parsed: RunConf,
    conf: dict,
    width: int,
    *,
    check: bool,
    unpause: bool,
    wait: bool,
    poll_s: float,
    timeout_s: float | None,
    retry_s: float,
) -> None:
    """``emprocess trigger --api-url``: check, send, and with ``wait`` follow the run."""
    import json

    from emprocess import trigger as trig

    api = cli_airflow.connect(api_url, token, username, password, retry_s=0.0)
    if check:
        for note in trig.check_ready(api, dag, width, unpause=unpause):
            print(note)
    elif unpause:
        api.set_paused(dag, False)
    answer = trig.trigger_run(api, dag, parsed.id, conf)
    print(json.dumps(answer, indent=2))
    if wait:
        api.retry_s = retry_s  # sent: from now on an api-server restart is waited out
        cli_airflow.follow(api, dag, parsed, width, poll_s=poll_s, timeout_s=timeout_s)


def _attach(
    run_id: str,
    width: int | None,
    api_url: str | None,
    token: str | None,
    username: str | None,
    password: str | None,
    poll_s: float,
    timeout_s: float | None,
    retry_s: float,
) -> None:
    """``emprocess trigger --attach RUN``: follow a run triggered elsewhere."""
    from emprocess.errors import EmprocessError

    if not api_url:
        raise typer.BadParameter("--attach needs --api-url")
    try:
        api = cli_airflow.connect(api_url, token, username, password, retry_s)
        dag = cli_airflow.dag_of(api, run_id, width)
        conf = cli_airflow.run_conf(api, dag, run_id)
        cli_airflow.follow(api, dag, conf, width, poll_s=poll_s, timeout_s=timeout_s)
    except EmprocessError as e:
        print(f"trigger failed: {e}")
        raise typer.Exit(1) from None


app.command()(cli_airflow.clear)

TRIGGER_WIDTH = 4
"""``trigger``'s width when neither ``--width`` nor the conf gives one, as ``run --scheduler``."""


@app.command()
def view(
    run_id: str = typer.Argument(..., metavar="RUN_ID", help="The run id (the conf's 'id')."),
    source: str = typer.Option(
        ..., "--source", "-s", help="The run's source bucket (the conf's 'source')."
    ),
    port: int = typer.Option(
        0, min=0, max=65535, help="Local runs: port of the neuroglancer viewer; 0 picks a free one."
    ),
    data_port: int = typer.Option(
        0,
        "--data-port",
        min=0,
        max=65535,
        help="Local runs: port of the data server; 0 picks a free one.",
    ),
    raw: bool = typer.Option(
        False,
        "--raw",
        help="Also show the lossless volume(s): SOURCE_chunk_RUN_ID/neuroglancer/raw and/or "
        "SOURCE_chunk_RUN_ID/raw.ome.zarr.",
    ),
    timeout: float = typer.Option(
        5.0,
        "--timeout",
        min=0.1,
        help="gs:// runs: seconds to wait for the anonymous public-read check.",
    ),
) -> None:
    """Show a run's volume in neuroglancer.

    With a local storage root (--storage-root, EMPROCESS_STORAGE_ROOT), serve the run's
    volume on 127.0.0.1 and print the viewer URL to open; stop with Ctrl-C. Otherwise print a link to the public
    neuroglancer app and warn when the bucket is not publicly readable.
    """
    import time

    from emprocess import storage
    from emprocess.errors import EmprocessError

    try:
        from emprocess.view import gcs_view, neuroglancer_source, serve_run
    except ModuleNotFoundError as e:  # werkzeug, the local data server's
        missing = (e.name or "werkzeug").split(".")[0]
        typer.echo(
            f"error: emprocess view needs {missing}: pip install 'clio-ingest[view]'", err=True
        )
        raise typer.Exit(1) from None

    if storage.local_root() is None:
        result = gcs_view(source, run_id, raw=raw, timeout_s=timeout)
        print(f"source: {neuroglancer_source(source, run_id)}")
        print(result.link)
        for warning in result.warnings():
            typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
        return
    try:
        session = serve_run(source, run_id, port, data_port=data_port, raw=raw)
    except EmprocessError as e:
        print(f"view failed: {e}")
        raise typer.Exit(1) from None
    with session:
        print(f"open {session.url}")
        print(f"(data served from {session.data_url}; Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopped")


@app.command("gen-uuid")
def gen_uuid_cmd(
    name: str = typer.Argument(
        ..., help="Run name: lowercase letters, digits, '-' and '_' (at most 40 characters)."
    ),
    source: str | None = typer.Option(
        None,
        "--source",
        help="Source bucket; also check that SOURCE_tmp_ID, SOURCE_ng_ID and SOURCE_chunk_ID are valid bucket names.",
    ),
) -> None:
    """Print a unique run id NAME_<12 hex digits> for the conf key "id"."""
    from emprocess.errors import EmprocessError
    from emprocess.tools import gen_uuid

    try:
        print(gen_uuid(name, source=source))
    except EmprocessError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from None


@app.command("adopt-bucket")
def adopt_bucket(
    bucket: str = typer.Argument(..., help="An existing bucket (GCS, or under the storage root)."),
) -> None:
    """Mark an existing bucket as made by emprocess, so that runs write into it.

    Runs mark the buckets they create (an object .emprocess-bucket) and refuse to
    write into a bucket of the same name that holds data without it (one made by
    hand or by the original system, e.g. an old SOURCE_process).
    """
    from emprocess import storage
    from emprocess.errors import EmprocessError

    try:
        storage.adopt_bucket(bucket)
    except EmprocessError as e:
        print(f"adopt-bucket failed: {e}")
        raise typer.Exit(1) from None
    print(f"bucket {bucket!r} is marked as made by emprocess; runs will adopt it")


@app.command()
def symlinks(
    src: str = typer.Argument(..., help="Folder holding the images."),
    dest: str = typer.Argument(..., help="Folder for the numbered links (created if missing)."),
    template: str = typer.Option(
        "img.%05d.png", help="printf template of the link names, one integer field."
    ),
    first_z: int = typer.Option(0, "--first-z", min=0, help="Number of the first slice."),
    pattern: str = typer.Option("*", help="Glob selecting the images in SRC."),
    hard: bool = typer.Option(
        False,
        "--hard",
        help="Hard links instead of symlinks (same file system): what `emprocess run DEST` "
        "needs, since the services refuse links that lead out of the storage root.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the links it would make, make none."
    ),
) -> None:
    """Number an image folder's files as symlinks img.00000.png, img.00001.png, ... in DEST.

    Files are taken in natural order (slice2 before slice10). Running it again is
    harmless; a file in DEST that is in the way is an error and nothing is created.
    """
    from emprocess.errors import EmprocessError
    from emprocess.tools import create_symlinks, plan_symlinks

    try:
        if dry_run:
            plan = plan_symlinks(src, dest, template, first_z, pattern)
            links = [(str(link), str(target)) for link, target in plan]
        else:
            links = create_symlinks(src, dest, template, first_z, pattern, hard=hard)
    except EmprocessError as e:
        raise typer.BadParameter(str(e)) from None
    for link, target in links:
        print(f"{link} -> {target}")
    print(
        f"{len(links)} slices: image {template!r}, minz {first_z}, maxz {first_z + len(links) - 1}"
    )


@app.command()
def cleanup(
    root: str | None = typer.Option(
        None, "--root", help="Local storage root (default: the command's, --storage-root)."
    ),
) -> None:
    """Apply the recorded lifecycle rules of local buckets: delete objects past their age.

    Google Cloud Storage applies lifecycle rules itself; the local storage root
    only records them (e.g. the run's SOURCE_tmp_ID after cleanup_images).
    """
    from emprocess.errors import EmprocessError
    from emprocess.tools import apply_cleanup

    try:
        deleted = apply_cleanup(root)
    except EmprocessError as e:
        raise typer.BadParameter(str(e), param_hint="--root") from None
    print(f"deleted {deleted} object(s) past their bucket's lifecycle age")


@app.command()
def report(
    run_id: str = typer.Argument(..., help="The run's id (conf key id)."),
    source: str = typer.Option(
        ..., "--source", "-s", help="The run's source bucket; only SOURCE_process is read."
    ),
    out: str = typer.Option(
        "report",
        "--out",
        "-o",
        help="Folder for report.html, report.json, progress.png and qc.png.",
    ),
    min_inliers: int = typer.Option(
        50, min=0, help="Flag alignment pairs whose model has fewer inlier matches."
    ),
    max_residual_px: float = typer.Option(
        2.0,
        min=0.0,
        help="Flag alignment pairs whose mean inlier residual is larger (px as matched, i.e. at 1/downsample_factor).",
    ),
    stall_after_s: float = typer.Option(
        1800.0,
        min=1.0,
        help="Call an unfinished run stalled after this many seconds without a new record.",
    ),
    records: bool | None = typer.Option(
        None,
        "--records/--no-records",
        help="Read every cache record (retries, request times, QC before collect): one read per mini-task; "
        "--no-records needs only listings. Default: read them when there are at most 5000.",
        show_default=False,
    ),
) -> None:
    """Report a run's progress, ETA, state and alignment QC from its process bucket."""
    from emprocess.errors import EmprocessError
    from emprocess.report import run_report

    try:
        rep = run_report(
            source, run_id, out, min_inliers=min_inliers, max_residual_px=max_residual_px,
            stall_after_s=stall_after_s, read_records=records,
        )  # fmt: skip
    except EmprocessError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    print(rep.summary_text())
    print(f"\nwrote report.html, report.json, progress.png, qc.png and quality.png to {out}")


@app.command("conf-reference")
def conf_reference() -> None:
    """Print the run configuration keys as a Markdown table, from the schema."""
    from emprocess.workflow.conf import conf_reference_markdown

    print(conf_reference_markdown(), end="")


@app.command("settings-reference")
def settings_reference() -> None:
    """Print the EMPROCESS_* environment variables as a Markdown table, from the schema."""
    from emprocess.settings import settings_reference_markdown

    print(settings_reference_markdown(), end="")


DEMO_SOURCE = "demo-stack"
DEMO_RUN_ID = "demo"


@app.command()
def demo(
    workdir: str = typer.Option("work", help="Folder for the storage root, Airflow and logs."),
    slices: int = typer.Option(64, min=2, help="Slices of the synthetic stack."),
    size: int = typer.Option(1024, min=64, help="Side of the square slices in px."),
    width: int = typer.Option(4, min=1, help="DAG width (emprocess_width4_v... by default)."),
) -> None:
    """The main job: a synthetic stack with drift, aligned and written, ready to view.

    Runs the real workflow on the embedded default (a local storage root under
    WORKDIR): both services under gunicorn, the DAG through real Airflow. Running
    it again reuses the stack and every cached result.
    """
    from pathlib import Path

    from emprocess import storage

    work = Path(workdir).resolve()
    with storage.use(_storage_settings(storage_root=work / "storage")) as chosen:
        _demo(work, slices, size, width, chosen)


def _demo(work: Path, slices: int, size: int, width: int, chosen: StorageEnv) -> None:
    import time

    from emprocess import storage
    from emprocess.errors import EmprocessError
    from emprocess.localrun import RunProgress, run_dag
    from emprocess.sample import Drift, write_sample

    t0 = time.monotonic()
    storage.create_bucket(DEMO_SOURCE)
    truth_url = storage.bucket_url(DEMO_SOURCE, "truth.json")
    if (
        storage.exists(truth_url)
        and len(storage.list_keys(storage.bucket_url(DEMO_SOURCE))) == slices + 1
    ):
        print(f"sample stack already in {work / 'storage' / DEMO_SOURCE}")
    else:
        print(f"writing a synthetic stack of {slices} slices of {size}x{size} px with drift ...")
        # FIB-SEM drifts by shifts and small rotations, not by scale or shear: the
        # global solve (regularized toward rigid) is made for that drift.
        rigid = Drift(max_scale=0.0, max_shear=0.0)
        write_sample(storage.bucket_url(DEMO_SOURCE), slices, size, size, seed=0, drift=rigid)
    dag, conf_width = _dag_for(width)
    conf = _build_conf(
        id=DEMO_RUN_ID, image="img.%05d.png", minz=0, maxz=slices - 1, source=DEMO_SOURCE,
        downsample_factor=2, width=conf_width,
    )  # fmt: skip
    print(f"running {dag} ...")
    try:
        with RunProgress(conf.source, conf.id) as progress:
            doc = run_dag(conf, dag, work, progress=progress, storage_settings=chosen)
    except EmprocessError as e:
        print(f"demo failed: {e}")
        raise typer.Exit(1) from None
    _print_outcome(conf, doc, time.monotonic() - t0)
    from emprocess.report import run_report

    rep = run_report(DEMO_SOURCE, DEMO_RUN_ID, str(work / "report"))
    print("\n" + rep.summary_text())
    print(f"report with plots: {work / 'report' / 'report.html'}")
    print("\nview it in neuroglancer (serves the volume on 127.0.0.1 and prints the link):")
    print(
        f"  .venv/bin/emprocess --storage-root {chosen.storage_root} view {DEMO_RUN_ID} "
        f"--source {DEMO_SOURCE}"
    )


def _print_outcome(conf: RunConf, doc: dict, seconds: float) -> None:
    from emprocess import storage

    print(
        f"\ndone in {seconds:.0f} s: {doc['slices']} slices, canvas {doc['bbox'][0]}x{doc['bbox'][1]} px"
    )
    print(f"  storage:     {storage.backend_description()}")
    print(
        f"  records:     {conf.process_url()}/  (init.json, align/transforms.json, qc.csv, complete.json)"
    )
    print(f"  neuroglancer source: {doc['neuroglancer']}")
    for name, stage in doc.get("stages", {}).items():
        print(f"  stage {name}: {stage}")


def run_as_script(command: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Run ``emprocess COMMAND`` under a script's name (scripts/*.py); exits as a CLI does.

    Raises:
        SystemExit: always; 0 on success, 2 for bad arguments (with the usage).
    """
    import sys
    from pathlib import Path

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    cmd.main(sys.argv[1:] if argv is None else argv, prog or Path(sys.argv[0]).name)
    raise SystemExit(0)  # pragma: no cover  (click's main exits itself)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
