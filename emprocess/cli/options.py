"""Command-line options of the conf keys, made from RunConf, so their defaults live there alone.

``emprocess run`` and ``trigger`` declare the keys that need their own spelling on the
command line (``--id``, ``--raw``, text for ``resolution``/``intensity``) with
:func:`conf_option` and get one option for every other simple key from
:func:`with_every_conf_key`; help, bounds, choices and defaults all come from
:class:`emprocess.workflow.conf.RunConf`, which also feeds the DAG's trigger form and the
README table.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import annotated_types
import typer
from rich.markup import escape

from emprocess.workflow.conf import RunConf


def conf_help(key: str) -> str:
    """A run option's help, taken from the run configuration schema the DAG uses."""
    # Typer renders help as rich markup, where "[x, y, z]" would vanish as a tag.
    return escape(RunConf.model_fields[key].description or key)


SCHEMA_DEFAULT: Any = object()
CONF_PANEL = "Run configuration (conf keys)"


def conf_option(
    key: str,
    *decls: str,
    default: Any = SCHEMA_DEFAULT,
    note: str = "",
    text: bool = False,
    **kwargs: Any,
) -> Any:
    """A ``typer.Option`` for the conf key ``key``: default, help and bounds from RunConf.

    So a default lives in the schema alone (the DAG's trigger form and the README table
    read it too).

    Args:
        key: the field of :class:`emprocess.workflow.conf.RunConf`.
        decls: the option's names; default Typer's, from the parameter's name.
        default: only where the command's default is not the schema's: None for an
            option sent only when given (required keys that ``trigger`` may take from
            ``--conf``, ``run``'s own ``--id``, the generated options).
        note: said after the schema's description.
        text: the command line gives the value as text, numbers separated by commas or a
            word (``resolution``, ``intensity``; :func:`numbers` reads it), so the
            default is that text too.
    """
    field = RunConf.model_fields[key]
    if default is SCHEMA_DEFAULT:
        default = ... if field.is_required() else field.default
        if text and isinstance(default, list | float | int):
            default = _as_text(default)
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            kwargs.setdefault("min", bound.ge)
        elif isinstance(bound, annotated_types.Le):
            kwargs.setdefault("max", bound.le)
    kwargs.setdefault("rich_help_panel", CONF_PANEL)
    return typer.Option(default, *decls, help=conf_help(key) + note, **kwargs)


def _as_text(value: float | list[float]) -> str:
    """A conf number or list of numbers as the command line writes it: 8, 4,4,40."""
    return ",".join(f"{v:g}" for v in (value if isinstance(value, list) else [value]))


RUN_CONF_PARAMS = {"run_id": "id", "raw": "create_raw_pyramid"}
"""Parameters of ``run`` that are conf keys under another name."""


def option_type(annotation: Any) -> Any:
    """The command-line type of a conf field: bool, int, float, str or a Literal of words;
    None for what the command line does not take (lists, mixed unions)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation in (bool, int, float, str):
        return annotation
    if typing.get_origin(annotation) is typing.Literal:
        words = typing.get_args(annotation)
        return annotation if all(isinstance(w, str) for w in words) else None
    return None


def _shown(default: Any) -> str | bool:
    """A schema default as ``--help`` shows it (False: none to show)."""
    if default is None:
        return False
    return str(default).lower() if isinstance(default, bool) else str(default)


def with_every_conf_key(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` an option for every simple conf key it does not declare itself.

    Booleans, numbers, words and choices of words, from the schema: its description as
    help, its default shown but not sent (so the schema's default applies and lives
    there alone), its bounds and choices checked by the command line. List-valued keys
    (``skip_slices``) stay for ``trigger --conf``. The command gets the values given in
    its parameter ``more_conf``.
    """
    own = inspect.signature(command, eval_str=True)
    declared = {RUN_CONF_PARAMS.get(name, name) for name in own.parameters}
    extra = []
    for key, field in RunConf.model_fields.items():
        kind = option_type(field.annotation)
        if key in declared or kind is None:
            continue
        name = key.replace("_", "-")
        decls = (f"--{name}/--no-{name}",) if kind is bool else (f"--{name}",)
        shown = _shown(field.default)
        info = conf_option(key, *decls, default=None, show_default=shown)
        extra.append(inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind | None
        ))  # fmt: skip
    names = [p.name for p in extra]

    @functools.wraps(command)
    def with_conf(**values: Any) -> None:
        more = {name: values.pop(name) for name in names}
        command(**values, more_conf={k: v for k, v in more.items() if v is not None})

    kept = [p for p in own.parameters.values() if p.name != "more_conf"]
    with_conf.__signature__ = own.replace(parameters=[*kept, *extra])  # type: ignore[attr-defined]
    with_conf.__annotations__ = {p.name: p.annotation for p in [*kept, *extra]}
    return with_conf


def numbers(value: str, key: str) -> float | list[float] | str:
    """A conf value given on the command line: "8" -> 8.0, "4,4,40" -> [4.0, 4.0, 40.0];
    a word ("auto") stays a word, for the schema to judge."""
    parts = [p.strip() for p in value.split(",")]
    try:
        found = [float(p) for p in parts]
    except ValueError:
        if len(parts) == 1:
            return value
        raise typer.BadParameter(
            f"--{key} {value!r}: expected numbers separated by commas"
        ) from None
    return found[0] if len(found) == 1 else found


RESOLUTION_HELP = " On the command line: 8, or x,y,z such as 4,4,40."
INTENSITY_HELP = " On the command line: auto, full, or low,high such as 300,3800."
# The conf options `run` and `trigger` share, from the schema.
RAW = conf_option("create_raw_pyramid", "--raw/--no-raw")
RESOLUTION = conf_option("resolution", text=True, note=RESOLUTION_HELP)
INTENSITY = conf_option("intensity", text=True, note=INTENSITY_HELP)
