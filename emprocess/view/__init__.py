"""Viewing a run's volume in neuroglancer: links for gs:// outputs, local serving for local runs.

A run's JPEG pyramid is ``gs://SOURCE_ng_RUN_ID/neuroglancer/jpeg`` and its lossless one
``gs://SOURCE_chunk_RUN_ID/neuroglancer/raw`` (precomputed) and/or
``gs://SOURCE_chunk_RUN_ID/raw.ome.zarr`` (OME-Zarr 0.5, conf ``raw_format``, shown as a
``zarr3://`` layer). On Google Cloud Storage the viewer reads
the bucket itself, so a link to the public neuroglancer app is all a user needs, as long
as the bucket is publicly readable and answers CORS. With ``EMPROCESS_STORAGE_ROOT`` the
buckets are folders: :func:`serve_run` serves them over HTTP on 127.0.0.1 (with the byte
ranges that sharded volumes need) and opens the viewer of the ``neuroglancer`` package.

Viewer state: dimensions are always set explicitly (x, y, z in nm at the volume's scale-0
resolution); without them neuroglancer scales the view in metres and shows nothing.

The modules: :mod:`.state` (viewer state and links), :mod:`.gcs` (the anonymous
public-read/CORS checks and the link of a run on GCS), :mod:`.dataserver` (local folders
over HTTP), :mod:`.session` (a local viewer on a local run).
"""

from emprocess.view.dataserver import (
    DATA_SERVER_READ_TIMEOUT_S,
    DATA_SERVER_THREADS,
    DEFAULT_ORIGINS,
    LOOPBACK_HOSTS,
    DataServer,
    RequestRecord,
)
from emprocess.view.gcs import (
    GCS_PUBLIC_URL,
    PUBLIC_CHECK_TIMEOUT_S,
    Access,
    GcsView,
    PublicCheck,
    check_public_read,
    gcs_view,
)
from emprocess.view.session import ViewSession, serve_run
from emprocess.view.state import (
    CHANNEL_COLOURS,
    CHANNEL_SHADER,
    DEFAULT_RESOLUTION_NM,
    NEUROGLANCER_APP,
    OVERVIEW_PX,
    PROJECTION_MARGIN,
    RGB_SHADER,
    VolumeGeometry,
    channel_layer,
    channel_shader,
    chunk_bucket,
    geometry_from_info,
    layer_source,
    metadata_key,
    neuroglancer_link,
    neuroglancer_source,
    ng_bucket,
    ome_zarr_layer,
    raw_formats,
    viewer_state,
)

__all__ = [
    "CHANNEL_COLOURS",
    "CHANNEL_SHADER",
    "DATA_SERVER_READ_TIMEOUT_S",
    "DATA_SERVER_THREADS",
    "DEFAULT_ORIGINS",
    "DEFAULT_RESOLUTION_NM",
    "GCS_PUBLIC_URL",
    "LOOPBACK_HOSTS",
    "NEUROGLANCER_APP",
    "OVERVIEW_PX",
    "PROJECTION_MARGIN",
    "PUBLIC_CHECK_TIMEOUT_S",
    "RGB_SHADER",
    "Access",
    "DataServer",
    "GcsView",
    "PublicCheck",
    "RequestRecord",
    "ViewSession",
    "VolumeGeometry",
    "channel_layer",
    "channel_shader",
    "check_public_read",
    "chunk_bucket",
    "gcs_view",
    "geometry_from_info",
    "layer_source",
    "metadata_key",
    "neuroglancer_link",
    "neuroglancer_source",
    "ng_bucket",
    "ome_zarr_layer",
    "raw_formats",
    "serve_run",
    "viewer_state",
]
