"""The environment settings of the services, the HTTP client and storage, as one schema.

Every ``EMPROCESS_*`` variable is a described field of a pydantic-settings class here;
a bad value is refused when it is read (at a service's start-up, when a batch task
starts, or when the CLI starts) with an error naming the variable. Each process reads
them once, where it starts, and hands them down (:func:`emprocess.storage.configure`, the
services' ``create_app``); nothing reads them per call. Processes started here get their
settings as variables built by :func:`environ`, from the same classes. The README's
table is generated from these classes (``emprocess settings-reference``) and a test keeps
it equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from emprocess.errors import InvalidInput

PREFIX = "EMPROCESS_"


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", frozen=True)


class HttpEnv(_Settings):
    """How the DAG's batch tasks send requests to the services."""

    http_threads: int = Field(8, ge=1, le=256, description="Requests in flight per batch task.")
    http_attempts: int = Field(
        6, ge=1, le=100, description="Tries per request before the mini-task fails."
    )
    http_backoff_s: float = Field(
        2.0, ge=0.0, description="First wait before a retry, in seconds; doubles each try."
    )
    http_max_backoff_s: float = Field(120.0, ge=0.0, description="Longest wait between tries, s.")
    http_connect_timeout_s: float = Field(10.0, gt=0.0, description="Connect timeout, s.")
    http_timeout_s: float = Field(
        3600.0,
        gt=0.0,
        description="Read timeout, s (Cloud Run's longest request: a /ngshard cube may take "
        "minutes, and giving up early only makes a retry redo it).",
    )
    stagger_step_s: float = Field(
        1.0, ge=0.0, description="Start delay per worker id of wide DAGs (32 or more), s."
    )


class ServiceEnv(_Settings):
    """Limits and tuning of the alignment and emwrite services."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the services."
    )
    align_max_pixels: int = Field(
        32768 * 32768, gt=0, description="Largest slice (pixels) the alignment service takes."
    )
    emwrite_max_pixels: int = Field(
        32768 * 32768, gt=0, description="Largest canvas (pixels) /alignedslice takes."
    )
    emwrite_max_image_bytes: int = Field(
        1 << 30, gt=0, description="Largest decoded slice (bytes) /alignedslice takes."
    )
    window_px: int = Field(
        12288,
        ge=1024,
        multiple_of=1024,
        description="Side of the windows /alignedslice warps and CLAHEs a large slice in.",
    )
    tile_codec: Literal["raw", "png"] = Field(
        "raw", description="Encoding of the tmp bucket's tiles."
    )
    io_threads: int = Field(16, ge=1, le=256, description="Storage reads and writes in flight.")
    allowed_hosts: str = Field(
        "",
        max_length=1000,
        description="Comma-separated host names (no port) a service answers in the Host "
        "header; empty: any (Cloud Run checks its own). `emprocess serve` on 127.0.0.1 "
        "sets 127.0.0.1,localhost, so a web page cannot reach it by DNS rebinding.",
    )


class StorageEnv(_Settings):
    """Where storage is, and how long its requests are retried."""

    storage_root: Path | None = Field(
        None,
        description="Local folder standing in for Google Cloud Storage: gs://B/K is ROOT/B/K. "
        "Unset or empty: Google Cloud Storage (or its emulator, STORAGE_EMULATOR_HOST).",
    )
    storage_retry_s: float = Field(
        120.0, ge=0.0, description="Deadline of GCS request retries, s; 0 turns them off."
    )

    @field_validator("storage_root", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("storage_root")
    @classmethod
    def _a_folder(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        # Absolute, so a child process started in another folder finds the same root.
        path = value.expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is not a folder")
        return path


S = TypeVar("S", bound=_Settings)

SCHEMAS: tuple[type[_Settings], ...] = (HttpEnv, ServiceEnv, StorageEnv)


def env_name(cls: type[_Settings], field: str) -> str:
    """The environment variable of one field, e.g. ``EMPROCESS_STORAGE_ROOT``."""
    if field not in cls.model_fields:
        raise KeyError(f"{cls.__name__} has no field {field!r}")
    return f"{PREFIX}{field.upper()}"


def load(cls: type[S], **chosen: Any) -> S:
    """``cls`` read from the environment, with the fields in ``chosen`` given by the caller.

    Raises:
        InvalidInput: naming each bad variable and why.
    """
    try:
        return cls(**chosen)
    except ValidationError as e:
        problems = [
            f"{PREFIX}{str(err['loc'][0]).upper()}={err.get('input')!r}: "
            + str(err["msg"]).removeprefix("Value error, ")
            for err in e.errors()
        ]
        raise InvalidInput("bad environment: " + "; ".join(problems)) from None


def environ(*chosen: _Settings) -> dict[str, str]:
    """The variables that hand these settings to a child process (a service, an Airflow task).

    Every field is written, so the child gets exactly these settings whatever the parent's
    environment holds; None is written as empty (unset).
    """
    out = {}
    for settings in chosen:
        for name in type(settings).model_fields:
            value = getattr(settings, name)
            out[env_name(type(settings), name)] = "" if value is None else str(value)
    return out


def settings_reference_markdown() -> str:
    """The README's table of every variable: name, default, meaning."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for cls in SCHEMAS:
        for name, field in cls.model_fields.items():
            default = "unset" if field.default is None else f"`{field.default}`"
            rows.append(f"| `{PREFIX}{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows) + "\n"
