"""The ``emprocess`` command: sample data, local services, benchmarks and runs.

The root group and its options live here, with every command registered in the order
``--help`` lists them; each command lives in the module of its responsibility: local runs
(:mod:`.run`), Airflow and Composer (:mod:`.trigger`, :mod:`.rest`), looking at a run
(:mod:`.view`), the services (:mod:`.serve`), small tools (:mod:`.tools`) and the
benchmarks (:mod:`.bench`).
"""

from __future__ import annotations

import logging

import typer

from emprocess import __version__
from emprocess.cli import bench, rest, run, serve, tools, trigger, view
from emprocess.cli.common import storage_settings
from emprocess.cli.serve import SERVE_TIMEOUT_S, SERVICES, WORKER_CLASS

__all__ = ["SERVE_TIMEOUT_S", "SERVICES", "WORKER_CLASS", "app", "main", "run_as_script"]

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
    chosen = storage_settings(storage_root=storage_root) if storage_root else None
    ctx.with_resource(storage.use(chosen or storage_settings()))


# In the order `emprocess --help` lists them (the bench group comes last).
app.command("sample")(tools.sample)
app.command("serve")(serve.serve)
app.command("run")(run.run)
app.command("trigger")(trigger.trigger)
app.command("clear")(rest.clear)
app.command("view")(view.view)
app.command("gen-uuid")(tools.gen_uuid_cmd)
app.command("adopt-bucket")(tools.adopt_bucket)
app.command("symlinks")(tools.symlinks)
app.command("cleanup")(tools.cleanup)
app.command("report")(view.report)
app.command("conf-reference")(tools.conf_reference)
app.command("settings-reference")(tools.settings_reference)
app.command("demo")(run.demo)
app.add_typer(bench.bench_app, name="bench")


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
