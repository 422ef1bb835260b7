"""The Airflow Params of the DAGs' trigger form and the Markdown reference of the run
configuration, both derived from :class:`RunConf`'s JSON schema."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from emprocess.workflow.conf import RunConf


def _flatten_optional(prop: dict[str, Any]) -> dict[str, Any]:
    """Turn pydantic's ``anyOf: [{X}, {null}]`` into ``type: [X, "null"]`` for Airflow's form."""
    any_of = prop.pop("anyOf", None)
    if any_of is None:
        return prop
    types: list[str] = []
    for option in any_of:
        option = dict(option)
        kind = option.pop("type")
        types.append(kind)
        prop.update(option)
    prop["type"] = types
    return prop


@functools.cache
def _json_schema() -> dict[str, Any]:
    return RunConf.model_json_schema(by_alias=True, mode="validation")


def param_specs(*, dynamic: bool, default_width: int) -> dict[str, dict[str, Any]]:
    """Keyword arguments of ``airflow.sdk.Param`` for each conf key, from :class:`RunConf`.

    Each spec holds ``description``, the JSON-schema ``type``, ranges, ``title`` and,
    for keys that have one, ``default``; required keys have no default, so the
    trigger form asks for them. The fixed-width DAGs get no ``width`` key.

    Args:
        dynamic: whether the spec is for the dynamic DAG (adds ``width``).
        default_width: default of ``width`` in the dynamic DAG.
    """
    specs: dict[str, dict[str, Any]] = {}
    for key, prop in copy.deepcopy(_json_schema())["properties"].items():
        if key == "width" and not dynamic:
            continue
        spec = _flatten_optional(dict(prop))
        if key == "width":
            spec["default"] = default_width
            spec["type"] = "integer"
        specs[key] = spec
    return specs


def conf_reference_markdown() -> str:
    """The run configuration as a Markdown table, from the schema (the README embeds it)."""
    schema = _json_schema()
    required = set(schema.get("required", []))
    rows = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for key, raw in schema["properties"].items():
        prop = _flatten_optional(copy.deepcopy(raw))
        kinds = prop.get("type", "")
        kind = " or ".join(kinds) if isinstance(kinds, list) else kinds
        default = "required" if key in required else json.dumps(prop.get("default"))
        bounds = []
        for name, sign in (
            ("minimum", ">="),
            ("exclusiveMinimum", ">"),
            ("maximum", "<="),
            ("exclusiveMaximum", "<"),
        ):
            if name in prop:
                bounds.append(f"{sign} {prop[name]}")
        for name, sign in (("minLength", "length >="), ("maxLength", "length <=")):
            if name in prop:
                bounds.append(f"{sign} {prop[name]}")
        description = prop.get("description", "").replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | {default} | {', '.join(bounds)} | {description} |")
    return "\n".join(rows) + "\n"
