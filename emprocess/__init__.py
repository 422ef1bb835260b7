"""clio-ingest: turn FIB-SEM image stacks into aligned multiscale neuroglancer volumes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clio-ingest")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
