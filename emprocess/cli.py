"""The ``emprocess`` command: sample data, local services, benchmarks and runs."""

from __future__ import annotations

import logging

import typer

from emprocess import __version__

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
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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


bench_app = typer.Typer(help="Benchmarks that print figures (speed, memory).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("align")
def bench_align(
    sizes: list[int] = typer.Option([2048, 8192], "--size", help="Square image side(s) in px."),
    downsamples: list[int] = typer.Option([1, 2, 4], "--downsample", help="Downsample factor(s)."),
    repeats: int = typer.Option(3, min=1, help="Runs per case; the fastest is reported."),
) -> None:
    """Seconds of wall and CPU per pair, on one core, with the recovered error in px."""
    import cv2

    from emprocess.bench_align import print_align_benchmark, run_align_benchmark

    cv2.setNumThreads(1)
    print_align_benchmark(run_align_benchmark(tuple(sizes), tuple(downsamples), repeats))


SERVICES = {
    "align": "emprocess.services.align:create_app()",
    "emwrite": "emprocess.services.emwrite:create_app()",
}


@app.command()
def serve(
    service: str = typer.Argument(..., help="Which service: align or emwrite."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 127.0.0.1 keeps it local."),
    port: int = typer.Option(8080, min=1, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, help="gunicorn worker processes."),
    threads: int = typer.Option(1, min=1, help="Threads per worker (Cloud Run: 1)."),
    timeout: int = typer.Option(900, min=0, help="Seconds a request may take; 0 = no limit."),
) -> None:
    """Run a service under gunicorn, as its container does (one worker, one request at a time)."""
    import os
    import shutil
    import sys

    if service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}; choose from {sorted(SERVICES)}")
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    argv = [
        gunicorn,
        "--bind", f"{host}:{port}",
        "--workers", str(workers),
        "--threads", str(threads),
        "--timeout", str(timeout),
        SERVICES[service],
    ]  # fmt: skip
    os.execv(gunicorn, argv) if os.path.isabs(gunicorn) else os.execvp(gunicorn, argv)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
