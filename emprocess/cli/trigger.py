"""``emprocess trigger``: a run on Cloud Composer or an Airflow REST API, its conf checked first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from emprocess.cli import rest
from emprocess.cli.common import build_conf, dag_for
from emprocess.cli.options import (
    INTENSITY,
    RAW,
    RESOLUTION,
    conf_help,
    conf_option,
    numbers,
    with_every_conf_key,
)

if TYPE_CHECKING:
    from emprocess.workflow.conf import RunConf


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
    retry_s: float = rest.RETRY_S_OPTION,
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
        parsed = build_conf(**conf)
        dag, conf_width = dag_for(parsed.width or width or TRIGGER_WIDTH)
        if conf_width is not None and "width" not in conf:
            conf["width"] = conf_width
    else:
        missing = [name for name, v in (("SOURCE", source), ("--image", image), ("--minz", minz),
                   ("--maxz", maxz), ("--id", run_id)) if v is None]  # fmt: skip
        if missing:
            raise typer.BadParameter(f"missing {', '.join(missing)} (or give --conf)")
        dag, conf_width = dag_for(width or TRIGGER_WIDTH)
        parsed = build_conf(
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

    api = rest.connect(api_url, token, username, password, retry_s=0.0)
    if check:
        for note in trig.check_ready(api, dag, width, unpause=unpause):
            print(note)
    elif unpause:
        api.set_paused(dag, False)
    answer = trig.trigger_run(api, dag, parsed.id, conf)
    print(json.dumps(answer, indent=2))
    if wait:
        api.retry_s = retry_s  # sent: from now on an api-server restart is waited out
        rest.follow(api, dag, parsed, width, poll_s=poll_s, timeout_s=timeout_s)


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
        api = rest.connect(api_url, token, username, password, retry_s)
        dag = rest.dag_of(api, run_id, width)
        conf = rest.run_conf(api, dag, run_id)
        rest.follow(api, dag, conf, width, poll_s=poll_s, timeout_s=timeout_s)
    except EmprocessError as e:
        print(f"trigger failed: {e}")
        raise typer.Exit(1) from None


TRIGGER_WIDTH = 4
"""``trigger``'s width when neither ``--width`` nor the conf gives one, as ``run --scheduler``."""
