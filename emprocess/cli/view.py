"""``emprocess view`` and ``report``: look at a run, its volume and its records."""

from __future__ import annotations

import typer


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
