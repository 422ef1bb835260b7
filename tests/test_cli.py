"""The emprocess command: sample, trigger (dry run and REST), bench wiring, help texts."""

from __future__ import annotations

import json
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest
from conftest import point_storage
from typer.testing import CliRunner

from emprocess.cli import app

runner = CliRunner()
TRIGGER = [
    "trigger",
    "src-bucket",
    "--image",
    "img.%05d.png",
    "--minz",
    "3",
    "--maxz",
    "40",
    "--id",
    "run_1",
]


def test_sample_writes_a_stack_with_truth(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["sample", str(tmp_path / "stack"), "-n", "3", "--size", "96", "80", "--first-z", "5"]
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "stack").iterdir())
    assert names == ["img.00005.png", "img.00006.png", "img.00007.png", "truth.json"]
    assert cv2.imread(str(tmp_path / "stack" / "img.00006.png"), cv2.IMREAD_UNCHANGED).shape == (
        80,
        96,
    )
    truth = json.loads((tmp_path / "stack" / "truth.json").read_text())
    assert (truth["minz"], truth["maxz"], sorted(truth["pairs"])) == (5, 7, ["5", "6"])


def test_sample_into_a_local_bucket_creates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_storage(monkeypatch, str(tmp_path))
    result = runner.invoke(app, ["sample", "gs://new-stack/sub", "-n", "2", "--size", "64", "64"])
    assert result.exit_code == 0, result.output
    from emprocess import storage

    assert storage.bucket_exists("new-stack")
    assert sorted(storage.list_keys("gs://new-stack/")) == [
        "sub/img.00000.png", "sub/img.00001.png", "sub/truth.json",
    ]  # fmt: skip
    # Into a bucket that exists already, too (creating it again is no error).
    result = runner.invoke(app, ["sample", "gs://new-stack", "-n", "2", "--size", "64", "64"])
    assert result.exit_code == 0, result.output


def test_sample_refuses_bad_sizes(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", str(tmp_path / "s"), "-n", "2", "--size", "10", "10"])
    assert result.exit_code != 0 and "10" in result.output


def test_trigger_composer_dry_run_prints_the_gcloud_command() -> None:
    result = runner.invoke(
        app,
        [
            *TRIGGER,
            "--composer-env",
            "env1",
            "--location",
            "us-east4",
            "--width",
            "32",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    assert argv[:10] == [
        "gcloud",
        "composer",
        "environments",
        "run",
        "env1",
        "--location",
        "us-east4",
        "dags",
        "trigger",
        "--",
    ]
    assert argv[10] == "emprocess_width32_v0.4" and argv[11:13] == ["--run-id", "run_1"]
    conf = json.loads(argv[argv.index("--conf") + 1])
    assert (
        conf["id"] == "run_1"
        and conf["minz"] == 3
        and conf["maxz"] == 40
        and conf["clip-limit"] == 0.02
    )


def test_trigger_other_widths_use_the_dynamic_dag() -> None:
    result = runner.invoke(
        app, [*TRIGGER, "--composer-env", "e", "--location", "l", "--width", "7", "--dry-run"]
    )
    argv = shlex.split(result.output.strip())
    assert argv[10] == "emprocess_v0.4"
    assert json.loads(argv[argv.index("--conf") + 1])["width"] == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--maxz", "1"], "minz"),
        (["--image", "img.png"], "image"),
        (["--id", "Run_One"], "Run_One"),
    ],
)
def test_trigger_validates_the_conf_before_sending(args: list[str], message: str) -> None:
    argv = list(TRIGGER)
    for flag, value in zip(args[::2], args[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    result = runner.invoke(app, [*argv, "--composer-env", "e", "--location", "l", "--dry-run"])
    assert result.exit_code == 2
    assert message in result.output


def test_trigger_needs_exactly_one_target() -> None:
    result = runner.invoke(app, [*TRIGGER, "--dry-run"])
    assert result.exit_code == 2 and "either --composer-env" in result.output


def test_trigger_rest_posts_the_dag_run(tmp_path: Path) -> None:
    """A recording HTTP server stands in for Airflow's API: it checks what is sent."""
    seen: list[tuple[str, dict, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            status = 409 if body["dag_run_id"] == "taken" else 200
            data = json.dumps({"dag_run_id": body["dag_run_id"], "state": "queued"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        result = runner.invoke(
            app, [*TRIGGER, "--api-url", api, "--token", "tok", "--width", "4", "--no-check"]
        )
        assert result.exit_code == 0, result.output
        path, body, auth = seen[0]
        assert path == "/api/v2/dags/emprocess_width4_v0.4/dagRuns" and auth == "Bearer tok"
        assert body["dag_run_id"] == "run_1" and body["conf"]["source"] == "src-bucket"
        taken = list(TRIGGER)
        taken[taken.index("--id") + 1] = "taken"
        result = runner.invoke(app, [*taken, "--api-url", api, "--no-check"])
        assert result.exit_code == 1, result.output
        assert "already has a run with id 'taken'" in result.output
        assert f"`emprocess clear taken --api-url {api} [--failed] --wait`" in result.output
    finally:
        server.shutdown()
        server.server_close()


def test_run_takes_a_folder_as_root_and_bucket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from emprocess.cli.run import storage_for

    point_storage(monkeypatch, None)
    (tmp_path / "my-stack").mkdir()
    before = dict(os.environ)
    bucket, chosen = storage_for(str(tmp_path / "my-stack"))
    assert (bucket, chosen.storage_root) == ("my-stack", tmp_path)
    assert dict(os.environ) == before  # passed on explicitly, not through os.environ
    assert storage_for("plain-bucket")[0] == "plain-bucket"
    (tmp_path / "Bad_Name").mkdir()
    from emprocess.errors import InvalidBucketName

    with pytest.raises(InvalidBucketName, match="Bad_Name"):
        storage_for(str(tmp_path / "Bad_Name"))


def test_the_storage_root_is_one_choice_for_the_whole_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--storage-root (or EMPROCESS_STORAGE_ROOT) steers every command; a bad one stops it
    before it does anything, naming the variable."""
    point_storage(monkeypatch, None)
    args = ["sample", "gs://opt-stack", "-n", "2", "--size", "64", "64"]
    result = runner.invoke(app, ["--storage-root", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "opt-stack").glob("*.png")) == [
        "img.00000.png", "img.00001.png",
    ]  # fmt: skip
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("EMPROCESS_STORAGE_ROOT", str(tmp_path / "a-file"))
    result = runner.invoke(app, ["view", "run1", "--source", "opt-stack"])
    assert result.exit_code == 2
    said = "".join(c for c in result.output if c not in "│╭╮╰╯─ \n")  # rich's box, wrapped
    assert "EMPROCESS_STORAGE_ROOT=" in said and "isnotafolder" in said, result.output


CONF_OPTIONS = {"run_id": "id", "raw": "create_raw_pyramid", "width": None, "location": None}
"""Parameters of ``run`` and ``trigger`` named otherwise than their conf key, or None: not
one (``--width`` picks the DAG, only the dynamic one gets the conf key; ``trigger
--location`` is the Composer environment's region)."""


@pytest.mark.parametrize("command", ["run", "trigger"])
def test_run_options_take_their_defaults_and_help_from_the_conf_schema(command: str) -> None:
    import annotated_types
    import typer
    from rich.markup import escape

    from emprocess.cli.options import numbers
    from emprocess.workflow.conf import RunConf

    params = typer.main.get_command(app).commands[command].params  # type: ignore[attr-defined]
    checked = set()
    for param in params:
        key = CONF_OPTIONS.get(str(param.name), str(param.name))
        field = RunConf.model_fields.get(key or "")
        if field is None or param.param_type_name != "option":
            continue
        checked.add(str(key))
        assert param.help and param.help.startswith(escape(field.description or "")[:40]), key
        for bound in field.metadata:  # the schema's bounds, checked before the schema
            if isinstance(bound, annotated_types.Ge):
                assert getattr(param, "min", None) == bound.ge, key
            if isinstance(bound, annotated_types.Le):
                assert getattr(param, "max", None) == bound.le, key
        if field.is_required() or key == "id":
            continue  # no schema default: required, or the command's own (SOURCE-run)
        if param.default is None and field.default is not None:  # unset: the schema's
            shown = str(field.default).lower() if field.annotation is bool else field.default
            assert param.show_default == str(shown), key
            continue
        default = param.default
        if key in ("resolution", "intensity"):  # given as text: 8, or 4,4,40
            default = numbers(str(default), key)
        assert default == field.default, key
    expected = {"image", "minz", "maxz", "id", "downsample_factor", "skip_align", "clip_limit",
                "create_raw_pyramid", "resolution", "intensity"}  # fmt: skip
    assert expected <= checked
    # ...and every other simple key, generated from the schema.
    assert {"email", "public", "neighbors", "global_solve", "bad_slice_fill"} <= checked


def test_run_takes_every_simple_conf_key(tmp_path: Path) -> None:
    """Keys `run` does not declare itself reach the conf (checked there) or are refused
    by the command line with the schema's bounds and choices."""
    (tmp_path / "stack").mkdir()
    base = ["run", str(tmp_path / "stack"), "--image", "img.%05d.png", "--minz", "0",
            "--maxz", "3", "--workdir", str(tmp_path / "work")]  # fmt: skip
    for extra, said in (
        (["--email", "not-an-address"], "is not an email address"),
        (["--neighbors", "9"], "'--neighbors': Input should be less than or equal to 6"),
        (["--bad-slice-fill", "grey"], "'grey' is not one of 'own', 'nearest', 'zeros'"),
    ):
        result = runner.invoke(app, [*base, *extra])
        flat = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and said in flat, result.output
    # trigger: in the conf it sends; only in --conf when that holds the whole conf.
    where = ["--composer-env", "e", "--location", "l", "--dry-run"]
    result = runner.invoke(app, [*TRIGGER, *where, "--neighbors", "2", "--no-global-solve"])
    assert result.exit_code == 0, result.output
    conf = json.loads(shlex.split(result.output.strip())[-1])
    assert (conf["neighbors"], conf["global_solve"], conf["channels"]) == (2, False, 1)
    whole = json.dumps({"id": "r1", "image": "i%d.png", "minz": 0, "maxz": 1, "source": "src"})
    result = runner.invoke(app, ["trigger", "--conf", whole, *where, "--neighbors", "2"])
    assert result.exit_code == 2 and "give --neighbors in it instead" in result.output


def test_a_schema_default_changes_the_command_line() -> None:
    """The CLI reads its defaults from the schema when it is built: change one there and
    `emprocess run --help` shows the new one (the DAG's form and the README table follow
    the same field)."""
    import subprocess
    import sys

    code = (
        "from emprocess.workflow.conf import RunConf\n"
        "RunConf.model_fields['clip_limit'].default = 0.0625\n"
        "RunConf.model_fields['downsample_factor'].default = 3\n"
        "from emprocess.cli import main\n"
        "main()\n"
    )
    env = {**__import__("os").environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-c", code, "run", "--help"], capture_output=True, text=True, env=env
    ).stdout
    lines = {line.split()[1]: line for line in out.splitlines() if line.startswith("│    --")}
    assert "[default: (0.0625)]" in lines["--clip-limit"], out
    assert "[default: (3)]" in lines["--downsample-factor"], out


def test_every_command_has_help() -> None:
    for command in ("sample", "serve", "run", "demo", "trigger", "bench"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, command


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("conf-reference", ("`clip-limit`", "`createRawPyramid`")),
        ("settings-reference", ("`EMPROCESS_HTTP_ATTEMPTS`", "`EMPROCESS_STORAGE_ROOT`")),
    ],
)
def test_readme_tables_are_the_schemas(command: str, expected: tuple[str, ...]) -> None:
    result = runner.invoke(app, [command])
    assert result.exit_code == 0
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = command.removesuffix("-reference")
    embedded = readme.split(f"<!-- {marker}-reference:start -->\n")[1].split(
        f"<!-- {marker}-reference:end -->"
    )[0]
    assert embedded == result.output, f"README's table is stale: paste `emprocess {command}`"
    assert all(key in embedded for key in expected)


def test_a_bad_setting_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from emprocess.errors import InvalidInput
    from emprocess.settings import HttpEnv, ServiceEnv, load

    monkeypatch.setenv("EMPROCESS_HTTP_ATTEMPTS", "0")
    with pytest.raises(
        InvalidInput, match=r"EMPROCESS_HTTP_ATTEMPTS='0': .*greater than or equal to 1"
    ):
        load(HttpEnv)
    monkeypatch.setenv("EMPROCESS_HTTP_ATTEMPTS", "3")
    monkeypatch.setenv("EMPROCESS_HTTP_TIMEOUT_S", "7.5")
    assert (load(HttpEnv).http_attempts, load(HttpEnv).http_timeout_s) == (3, 7.5)
    assert load(HttpEnv).http_threads == 8
    monkeypatch.setenv("EMPROCESS_TILE_CODEC", "gif")
    with pytest.raises(InvalidInput, match="EMPROCESS_TILE_CODEC='gif'"):
        load(ServiceEnv)


def test_peak_concurrency_counts_overlapping_batch_tasks() -> None:
    from emprocess.trigger import peak_concurrency

    def ti(task_id: str, start: int, end: int | None) -> dict:
        at = "2026-01-01T00:00:{:02d}+00:00"
        return {
            "task_id": task_id,
            "start_date": at.format(start),
            "end_date": at.format(end) if end is not None else None,
        }

    tis = [
        ti("align.affine_0", 0, 10), ti("align.affine_1", 2, 5), ti("align.affine_2", 5, 8),
        ti("align.write", 3, 4), ti("validate", 1, 9), ti("align.write", 20, None),
    ]  # fmt: skip
    # 0-10, 2-5 and 3-4 overlap (3); 5-8 starts as 2-5 ends; validate and unfinished ones do not count.
    assert peak_concurrency(tis) == 3
    assert peak_concurrency([]) == 0


def test_trigger_sends_a_whole_conf_as_given(tmp_path: Path) -> None:
    original = {"id": "orig_1", "image": "img.%05d.png", "minz": 0, "maxz": 9,
                "source": "src-bucket", "mail": "lab@example.org", "rawPyramid": False}  # fmt: skip
    (tmp_path / "conf.json").write_text(json.dumps(original))
    result = runner.invoke(
        app,
        ["trigger", "--conf", f"@{tmp_path / 'conf.json'}", "--width", "4",
         "--composer-env", "e", "--location", "l", "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    assert argv[10] == "emprocess_width4_v0.4" and argv[11:13] == ["--run-id", "orig_1"]
    assert json.loads(argv[argv.index("--conf") + 1]) == original  # legacy keys kept
    bad = runner.invoke(
        app, ["trigger", "--conf", '{"id": "x", "mail": 3}', "--api-url", "http://h", "--dry-run"]
    )
    assert bad.exit_code == 2 and "image: required key is missing" in bad.output
    for text, message in (("[1]", "JSON object"), ("{nope", "not JSON")):
        bad = runner.invoke(app, ["trigger", "--conf", text, "--api-url", "http://h"])
        assert bad.exit_code == 2 and message in bad.output
    missing = runner.invoke(app, ["trigger", "--api-url", "http://h", "--dry-run"])
    assert missing.exit_code == 2 and "missing SOURCE, --image" in missing.output
