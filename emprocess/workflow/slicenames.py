"""Slice file-name templates (``img.%05d.png``): exactly one printf integer field, and the
listing prefix before it."""

from __future__ import annotations

import re

# One printf conversion: "%%", or flags, width, precision, length and a conversion letter.
_PRINTF_FIELD = re.compile(r"%%|%(?P<spec>[#0\- +]*\d*(?:\.\d*)?[hlL]?)(?P<conv>.?)")
_INT_CONVERSIONS = "diu"
# Field width and precision of the template's integer field: "%0999999999d" would
# allocate a gigabyte per slice name before anything else could refuse it.
MAX_FIELD_WIDTH = 20


def template_prefix(template: str) -> str:
    """The literal text before the template's first field (a listing prefix), ``%%`` as ``%``."""
    for m in _PRINTF_FIELD.finditer(template):
        if m.group(0) != "%%":
            return template[: m.start()].replace("%%", "%")
    return template.replace("%%", "%")


def check_template(template: str) -> str:
    """Return ``template`` if it holds exactly one integer printf field, else raise ValueError.

    Accepted fields are ``%d``, ``%i``, ``%u`` with optional flags and width, e.g.
    ``%05d``; ``%%`` is a literal percent sign. Any other field (``%s``, ``%(z)d``) is refused.
    """
    ints = []
    for m in _PRINTF_FIELD.finditer(template):
        if m.group(0) == "%%":
            continue
        field = m.group(0)
        if m.group("conv") and m.group("conv") in _INT_CONVERSIONS:
            sizes = [int(n) for n in re.findall(r"\d+", m.group("spec") or "")]
            if any(n > MAX_FIELD_WIDTH for n in sizes):
                raise ValueError(
                    f"image template {template[:100]!r} has field {field!r}; its width and "
                    f"precision may be at most {MAX_FIELD_WIDTH}"
                )
            ints.append(field)
        else:
            raise ValueError(
                f"image template {template!r} has field {field!r}; only one integer field "
                "such as %05d or %d is allowed (write a literal % as %%)"
            )
    if len(ints) != 1:
        raise ValueError(
            f"image template {template!r} has {len(ints)} integer fields {ints}; it needs "
            "exactly one, such as img.%05d.png"
        )
    return template
