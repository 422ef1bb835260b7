"""``emprocess run`` and ``demo``: the whole workflow on this machine through real Airflow."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import typer

from emprocess.cli.common import THREADS_HELP, WORKERS_HELP, build_conf, dag_for, storage_settings
from emprocess.cli.options import (
    INTENSITY,
    RAW,
    RESOLUTION,
    conf_option,
    numbers,
    with_every_conf_key,
)

if TYPE_CHECKING:
    from pathlib import Path

    from emprocess.settings import StorageEnv
    from emprocess.workflow.conf import RunConf


def storage_for(source: str) -> tuple[str, StorageEnv]:
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
    return folder.name, storage_settings(storage_root=folder.parent)


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

    bucket, chosen = storage_for(source)
    if width is None:
        width = 4 if scheduler else 1
    dag, conf_width = dag_for(width)
    conf = build_conf(
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


DEMO_SOURCE = "demo-stack"
DEMO_RUN_ID = "demo"


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
    with storage.use(storage_settings(storage_root=work / "storage")) as chosen:
        _demo(work, slices, size, width, chosen)


def _demo(work: Path, slices: int, size: int, width: int, chosen: StorageEnv) -> None:
    import time

    from emprocess import storage
    from emprocess.errors import EmprocessError
    from emprocess.localrun import RunProgress, run_dag
    from emprocess.sample import TRUTH_NAME, Drift, write_sample

    t0 = time.monotonic()
    storage.create_bucket(DEMO_SOURCE)
    truth_url = storage.bucket_url(DEMO_SOURCE, TRUTH_NAME)
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
    dag, conf_width = dag_for(width)
    conf = build_conf(
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
        f"  records:     {conf.layout.process_url()}/  (init.json, align/transforms.json, qc.csv, complete.json)"
    )
    print(f"  neuroglancer source: {doc['neuroglancer']}")
    for name, stage in doc.get("stages", {}).items():
        print(f"  stage {name}: {stage}")
