"""Small ``emprocess`` tools: sample stacks, run ids, buckets, slice links, references."""

from __future__ import annotations

import typer


def sample(
    dest: str = typer.Argument(
        ..., help="Where to write: a folder, file:///abs/path, or gs://BUCKET/PREFIX."
    ),
    slices: int = typer.Option(64, "--slices", "-n", min=1, help="Number of slices."),
    size: tuple[int, int] = typer.Option((1024, 1024), help="Slice WIDTH HEIGHT in pixels."),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same bytes."),
    first_z: int = typer.Option(0, "--first-z", min=0, help="Number of the first slice."),
    image: str = typer.Option("img.%05d.png", help="printf template of the slice names."),
) -> None:
    """Write a synthetic FIB-SEM-like stack with known drift, and its truth.json."""
    from emprocess.errors import EmprocessError
    from emprocess.sample import write_sample

    try:
        truth = write_sample(
            dest, slices, size[0], size[1], seed=seed, first_z=first_z, template=image
        )
    except EmprocessError as e:
        raise typer.BadParameter(str(e)) from None
    print(
        f"wrote {slices} slices {truth['image']} z={truth['minz']}..{truth['maxz']} "
        f"({size[0]}x{size[1]}) and truth.json to {dest}"
    )


def gen_uuid_cmd(
    name: str = typer.Argument(
        ..., help="Run name: lowercase letters, digits, '-' and '_' (at most 40 characters)."
    ),
    source: str | None = typer.Option(
        None,
        "--source",
        help="Source bucket; also check that SOURCE_tmp_ID, SOURCE_ng_ID and SOURCE_chunk_ID are valid bucket names.",
    ),
) -> None:
    """Print a unique run id NAME_<12 hex digits> for the conf key "id"."""
    from emprocess.errors import EmprocessError
    from emprocess.tools import gen_uuid

    try:
        print(gen_uuid(name, source=source))
    except EmprocessError as e:
        raise typer.BadParameter(str(e), param_hint="NAME") from None


def adopt_bucket(
    bucket: str = typer.Argument(..., help="An existing bucket (GCS, or under the storage root)."),
) -> None:
    """Mark an existing bucket as made by emprocess, so that runs write into it.

    Runs mark the buckets they create (an object .emprocess-bucket) and refuse to
    write into a bucket of the same name that holds data without it (one made by
    hand or by the original system, e.g. an old SOURCE_process).
    """
    from emprocess import storage
    from emprocess.errors import EmprocessError

    try:
        storage.adopt_bucket(bucket)
    except EmprocessError as e:
        print(f"adopt-bucket failed: {e}")
        raise typer.Exit(1) from None
    print(f"bucket {bucket!r} is marked as made by emprocess; runs will adopt it")


def symlinks(
    src: str = typer.Argument(..., help="Folder holding the images."),
    dest: str = typer.Argument(..., help="Folder for the numbered links (created if missing)."),
    template: str = typer.Option(
        "img.%05d.png", help="printf template of the link names, one integer field."
    ),
    first_z: int = typer.Option(0, "--first-z", min=0, help="Number of the first slice."),
    pattern: str = typer.Option("*", help="Glob selecting the images in SRC."),
    hard: bool = typer.Option(
        False,
        "--hard",
        help="Hard links instead of symlinks (same file system): what `emprocess run DEST` "
        "needs, since the services refuse links that lead out of the storage root.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the links it would make, make none."
    ),
) -> None:
    """Number an image folder's files as symlinks img.00000.png, img.00001.png, ... in DEST.

    Files are taken in natural order (slice2 before slice10). Running it again is
    harmless; a file in DEST that is in the way is an error and nothing is created.
    """
    from emprocess.errors import EmprocessError
    from emprocess.tools import create_symlinks, plan_symlinks

    try:
        if dry_run:
            plan = plan_symlinks(src, dest, template, first_z, pattern)
            links = [(str(link), str(target)) for link, target in plan]
        else:
            links = create_symlinks(src, dest, template, first_z, pattern, hard=hard)
    except EmprocessError as e:
        raise typer.BadParameter(str(e)) from None
    for link, target in links:
        print(f"{link} -> {target}")
    print(
        f"{len(links)} slices: image {template!r}, minz {first_z}, maxz {first_z + len(links) - 1}"
    )


def cleanup(
    root: str | None = typer.Option(
        None, "--root", help="Local storage root (default: the command's, --storage-root)."
    ),
) -> None:
    """Apply the recorded lifecycle rules of local buckets: delete objects past their age.

    Google Cloud Storage applies lifecycle rules itself; the local storage root
    only records them (e.g. the run's SOURCE_tmp_ID after cleanup_images).
    """
    from emprocess.errors import EmprocessError
    from emprocess.tools import apply_cleanup

    try:
        deleted = apply_cleanup(root)
    except EmprocessError as e:
        raise typer.BadParameter(str(e), param_hint="--root") from None
    print(f"deleted {deleted} object(s) past their bucket's lifecycle age")


def conf_reference() -> None:
    """Print the run configuration keys as a Markdown table, from the schema."""
    from emprocess.workflow.params import conf_reference_markdown

    print(conf_reference_markdown(), end="")


def settings_reference() -> None:
    """Print the EMPROCESS_* environment variables as a Markdown table, from the schema."""
    from emprocess.settings import settings_reference_markdown

    print(settings_reference_markdown(), end="")
