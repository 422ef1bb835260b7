"""Small helpers behind the CLI's tools: run ids, numbered slice links, local lifecycle cleanup."""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

from emprocess import storage
from emprocess.errors import InvalidBucketName, InvalidInput, NotFound
from emprocess.layout import LONGEST_ROLE, run_bucket

log = logging.getLogger(__name__)

RUN_SUFFIX_HEX = 12
"""Hex digits of uuid4 appended to a run name."""

_RUN_NAME_CHARS = re.compile(r"[a-z0-9_-]+")
_MIN_BUCKET_CHARS = 3
_MAX_BUCKET_CHARS = 63  # without dots; run buckets never hold dots here
MAX_RUN_NAME_CHARS = (
    _MAX_BUCKET_CHARS
    - _MIN_BUCKET_CHARS
    - len(run_bucket("", LONGEST_ROLE, ""))
    - (1 + RUN_SUFFIX_HEX)
)
"""The longest run name whose id still fits in SOURCE_chunk_RUN_ID with a 3-character SOURCE."""


def check_run_name(name: str) -> str:
    """Return ``name`` if ``NAME_<hex>`` can be part of the run's bucket names, else raise.

    Allowed: 1 to :data:`MAX_RUN_NAME_CHARS` lowercase letters, digits, ``-`` and ``_``
    (GCS bucket names allow dots too, but dotted names need domain verification).

    Raises:
        InvalidInput: naming the bad characters and, for uppercase, the lowercase form.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"run name must be a non-empty string, got {name!r}")
    if not _RUN_NAME_CHARS.fullmatch(name):
        if name.lower() != name and _RUN_NAME_CHARS.fullmatch(name.lower()):
            raise InvalidInput(
                f"run name {name!r} has uppercase letters, which bucket names do not allow; "
                f"use {name.lower()!r}"
            )
        bad = sorted({c for c in name.lower() if not _RUN_NAME_CHARS.fullmatch(c)})
        raise InvalidInput(
            f"run name {name!r} has characters bucket names do not allow: "
            f"{', '.join(repr(c) for c in bad)}; use lowercase letters, digits, '-' and '_'"
        )
    if len(name) > MAX_RUN_NAME_CHARS:
        raise InvalidInput(
            f"run name {name!r} has {len(name)} characters; at most {MAX_RUN_NAME_CHARS} "
            f"fit, so that SOURCE_chunk_{name}_<{RUN_SUFFIX_HEX} hex> stays within "
            f"{_MAX_BUCKET_CHARS} characters"
        )
    try:  # the remaining rules, e.g. no "google"
        storage.check_bucket_name(run_bucket("src", LONGEST_ROLE, f"{name}_{'0' * RUN_SUFFIX_HEX}"))
    except InvalidBucketName as e:
        raise InvalidInput(f"run name {name!r} cannot be part of a bucket name: {e}") from None
    return name


def gen_uuid(name: str, source: str | None = None) -> str:
    """A unique run id ``NAME_<12 lowercase hex digits>`` (from uuid4) for the conf key "id".

    Args:
        name: the run name; lowercase letters, digits, ``-`` and ``_``.
        source: the source bucket, if known; then every bucket of the run
            (SOURCE_tmp_ID, SOURCE_ng_ID, SOURCE_chunk_ID) is checked too.

    Raises:
        InvalidInput: the name (or, with ``source``, a bucket name) is not valid.
    """
    check_run_name(name)
    run_id = f"{name}_{uuid.uuid4().hex[:RUN_SUFFIX_HEX]}"
    if source is not None:
        storage.check_bucket_name(source)
        room = _MAX_BUCKET_CHARS - len(run_bucket(source, LONGEST_ROLE, "")) - 1 - RUN_SUFFIX_HEX
        if room < 1:
            raise InvalidInput(
                f"source bucket {source!r} is too long for run buckets: "
                f"{run_bucket(source, LONGEST_ROLE, 'RUN_ID')} exceeds {_MAX_BUCKET_CHARS} "
                "characters even with a one-character run name"
            )
        if len(name) > room:
            raise InvalidInput(
                f"run name {name!r} is too long for source {source!r}: the bucket "
                f"{run_bucket(source, LONGEST_ROLE, run_id)} would have "
                f"{len(run_bucket(source, LONGEST_ROLE, run_id))} characters, "
                f"over {_MAX_BUCKET_CHARS}; with this source a run name may have at most "
                f"{room} characters"
            )
        for role in (LONGEST_ROLE, "tmp", "ng"):
            bucket = run_bucket(source, role, run_id)
            try:
                storage.check_bucket_name(bucket)
            except InvalidBucketName as e:
                raise InvalidInput(
                    f"run name {name!r} with source {source!r} gives the bucket name "
                    f"{bucket!r}, which is not valid: {e}"
                ) from None
    return run_id


# -- numbered slice links -----------------------------------------------------

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders embedded numbers by value: "slice2" before "slice10"."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in _DIGITS.split(name) if part
    )


def _check_template(template: str) -> str:
    from emprocess.workflow.slicenames import check_template  # the conf's own rule for "image"

    try:
        check_template(template)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    if "/" in template % 0:
        raise InvalidInput(f"template {template!r} holds a '/'; links are made in DEST only")
    return template


def _template_suffix(template: str) -> str:
    return Path(template % 0).suffix.lower()


def plan_symlinks(
    src_dir: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    template: str = "img.%05d.png",
    first_z: int = 0,
    pattern: str = "*",
) -> list[tuple[Path, Path]]:
    """(link, target) pairs that number SRC's files, without touching the file system.

    Files are the non-hidden regular files of ``src_dir`` matching the glob
    ``pattern``, in natural order; targets are absolute, so links work from anywhere.
    """
    _check_template(template)
    if not isinstance(first_z, int) or first_z < 0:
        raise InvalidInput(f"first_z must be a whole number >= 0, got {first_z!r}")
    src = Path(src_dir).expanduser().resolve()
    dest = Path(dest_dir).expanduser().resolve()
    if not src.is_dir():
        raise NotFound(f"source folder {str(src_dir)!r} does not exist or is not a folder")
    if src == dest:
        raise InvalidInput(
            f"destination {str(dest_dir)!r} is the source folder; links must go elsewhere "
            "(else a second run would number its own links)"
        )
    files = sorted(
        (p for p in src.glob(pattern) if p.is_file() and not p.name.startswith(".")),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise NotFound(f"no files match {pattern!r} in {str(src)!r}")
    return [(dest / (template % (first_z + i)), path) for i, path in enumerate(files)]


def create_symlinks(
    src_dir: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    template: str = "img.%05d.png",
    first_z: int = 0,
    pattern: str = "*",
    hard: bool = False,
) -> list[tuple[str, str]]:
    """Number an image folder's files as symlinks ``DEST/img.00000.png``, ``img.00001.png``, ...

    With ``hard``, the names are hard links instead: the form a local run needs, since
    the services refuse a symlink that leads out of its bucket (README, Security).

    Files are sorted naturally ("slice2" before "slice10"); the first gets number
    ``first_z``. Repeating the call is harmless: links that already point at the
    right file are kept. Links keep the template's name; a source file with another
    extension is linked anyway, with a warning (decoders read the content, not the name).

    Args:
        src_dir: folder holding the images.
        dest_dir: folder for the links; created if missing.
        template: printf template of the link names, one integer field.
        first_z: number of the first slice.
        pattern: glob selecting the images in ``src_dir``.
        hard: make hard links (same file system only) instead of symlinks.

    Returns:
        (link path, target path) per image, in slice order.

    Raises:
        InvalidInput: bad template or first_z; DEST already holds something else
            under a link's name (nothing is created then); hard links across file
            systems.
        NotFound: SRC is missing or no file matches.
    """
    plan = plan_symlinks(src_dir, dest_dir, template, first_z, pattern)
    conflicts = []
    for link, target in plan:
        if hard and link.exists() and not link.is_symlink():
            if not os.path.samefile(link, target):
                conflicts.append(f"{link} exists and is not a hard link of {target}")
        elif link.is_symlink():
            if hard or Path(os.readlink(link)) != target:
                conflicts.append(f"{link} is a link to {os.readlink(link)}, not to {target}")
        elif link.exists():
            conflicts.append(f"{link} exists and is not a link (wanted a link to {target})")
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise InvalidInput(
            "the destination already holds other files: " + "; ".join(conflicts[:3]) + more
        )

    want = _template_suffix(template)
    other = sorted({t.suffix.lower() for _, t in plan} - {want})
    if other:
        n = sum(1 for _, t in plan if t.suffix.lower() != want)
        log.warning(
            "%d of %d source files have the extension(s) %s, but the links are named %s "
            "by the template %r",
            n,
            len(plan),
            ", ".join(repr(s or "(none)") for s in other),
            repr(want or "(none)"),
            template,
        )

    Path(dest_dir).expanduser().mkdir(parents=True, exist_ok=True)
    made = 0
    for link, target in plan:
        if hard and not link.exists():
            try:
                os.link(target, link)
            except OSError as e:
                raise InvalidInput(
                    f"cannot hard-link {target} as {link} ({e.strerror}): hard links need "
                    "DEST on the same file system as SRC; copy the files there instead"
                ) from None
            made += 1
        elif not hard and not link.is_symlink():
            link.symlink_to(target)
            made += 1
    log.info("%d links made, %d already there, in %s", made, len(plan) - made, plan[0][0].parent)
    return [(str(link), str(target)) for link, target in plan]


# -- local lifecycle -------------------------------------------------------------


def apply_cleanup(root: str | os.PathLike[str] | None = None, now: float | None = None) -> int:
    """Enforce the recorded lifecycle rules of the buckets under a local storage root.

    GCS applies lifecycle rules itself; the local backend only records them, so
    this deletes every object older than its bucket's rule (e.g. the run's
    SOURCE_tmp_RUN_ID after cleanup_images set it).

    Args:
        root: the local storage root; None means ``EMPROCESS_STORAGE_ROOT``.
        now: the time to judge ages by (Unix seconds); None means now.

    Returns:
        The number of objects deleted.

    Raises:
        InvalidInput: no root given and ``EMPROCESS_STORAGE_ROOT`` unset.
        NotFound: the root is not a folder.
    """
    if root is None:
        if storage.local_root() is None:
            raise InvalidInput(
                f"no local storage root: pass one or set {storage.ROOT_ENV} "
                "(on Google Cloud Storage, lifecycle rules apply themselves)"
            )
        return storage.apply_lifecycle(now)
    from emprocess.storage.local import LocalBackend

    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise NotFound(f"local storage root {str(root)!r} is not a folder")
    return LocalBackend(path).apply_lifecycle(now)
