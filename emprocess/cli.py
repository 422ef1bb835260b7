"""The ``emprocess`` command: sample data, local services, benchmarks and runs."""

from __future__ import annotations

import logging

import typer

from emprocess import __version__

app = typer.Typer(
    help="Turn FIB-SEM image stacks into aligned, multiscale neuroglancer volumes.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"emprocess {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
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


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
