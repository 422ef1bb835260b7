"""``emprocess bench``: the benchmarks of :mod:`emprocess_bench`, each printing its figures."""

from __future__ import annotations

import logging
from typing import Any

import typer
from typer.core import TyperGroup

from emprocess.cli.common import THREADS_HELP, WORKERS_HELP

BENCH_EXTRA = "pip install -e '.[bench]' in a checkout of the repository"


class _BenchGroup(TyperGroup):
    """``emprocess bench``: says which extra to install when a benchmark cannot import.

    The benchmarks live in the ``emprocess_bench`` package beside ``emprocess`` (not in
    the images of the services or in Composer), their dependencies in the ``bench`` extra.
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
    corrections: bool = typer.Option(
        False, help="Each /alignedslice also destreaks and applies a gain and offset."
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
        corrections,
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
