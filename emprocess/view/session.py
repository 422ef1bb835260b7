"""A local viewer: the data server and neuroglancer's own server on a local run."""

from __future__ import annotations

import json
import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from emprocess import storage
from emprocess.errors import EmprocessError, InvalidInput, NotFound
from emprocess.kernels.omezarr import ZARR_JSON, dataset_path
from emprocess.layout import (
    COMPLETE,
    JPEG_PATH,
    RAW_OME_ZARR_PATH,
    RAW_PATH,
    RunLayout,
)
from emprocess.view.dataserver import DataServer
from emprocess.view.state import (
    _jpeg_channel_count,
    _layer_options,
    _volumes,
    chunk_bucket,
    geometry_from_info,
    layer_source,
    metadata_key,
    ng_bucket,
    ome_zarr_layer,
    raw_formats,
    viewer_state,
)
from emprocess.volume import INFO, info_key

log = logging.getLogger(__name__)


@dataclass
class ViewSession:
    """A running local viewer: the neuroglancer URL to open and the data server behind it."""

    url: str
    data_url: str
    data_server: DataServer
    viewer: Any

    def stop(self) -> None:
        """Stop the data server and neuroglancer's server (its viewer URLs stop working)."""
        self.data_server.stop()
        import neuroglancer

        neuroglancer.stop()

    def __enter__(self) -> ViewSession:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _import_neuroglancer() -> Any:
    try:
        import neuroglancer
    except ImportError:
        raise EmprocessError(
            "local viewing needs the neuroglancer package: pip install 'clio-ingest[view]'"
        ) from None
    return neuroglancer


def serve_run(
    source: str,
    run_id: str,
    port: int = 0,
    *,
    data_port: int = 0,
    raw: bool = False,
    layout: str = "4panel",
) -> ViewSession:
    """Serve a local run's volume(s) on 127.0.0.1 and open a neuroglancer viewer on them.

    Needs ``EMPROCESS_STORAGE_ROOT``. The data server exposes the JPEG pyramid at
    ``/neuroglancer/jpeg`` (and with ``raw`` the lossless one at ``/neuroglancer/raw``,
    and/or the OME-Zarr one at ``/raw.ome.zarr``, whichever the run has, as layers on top). Neuroglancer's server is process-wide: one session at a
    time, and :meth:`ViewSession.stop` stops it.

    Args:
        source: the run's source bucket name.
        run_id: the run id.
        port: port of neuroglancer's server (the URL to open); 0 picks a free one.
        data_port: port of the data server; 0 picks a free one.
        raw: also show the lossless volume(s): SOURCE_chunk_RUN_ID/neuroglancer/raw and/or
            SOURCE_chunk_RUN_ID/raw.ome.zarr.
        layout: neuroglancer layout ("4panel", "xy", ...).

    Raises:
        InvalidInput: no local storage root; NotFound: the run has no such volume.
    """
    root = storage.local_root()
    if root is None:
        raise InvalidInput(
            f"serving needs local storage ({storage.ROOT_ENV}); for gs:// outputs use gcs_view"
        )
    ng_folder = root / ng_bucket(source, run_id)
    count = _jpeg_channel_count(lambda path: (ng_folder / info_key(path)).is_file())
    chunk_folder = root / chunk_bucket(source, run_id)
    pre, zarr = raw_formats(lambda prefix: (chunk_folder / metadata_key(prefix)).is_file())
    volumes = _volumes(source, run_id, raw and pre, count, raw and zarr)
    mounts: dict[str, Path] = {}
    for _, bucket, prefix in volumes:
        folder = root / bucket / prefix
        if not (root / bucket / metadata_key(prefix)).is_file():
            hint = " (was createRawPyramid false?)" if prefix == RAW_PATH else ""
            raise NotFound(
                f"no volume at {folder}: {root / bucket / metadata_key(prefix)} is missing{hint}"
            )
        mounts[prefix] = folder
    complete = RunLayout(source, run_id).process_url(COMPLETE)
    if not storage.exists(complete):
        log.warning("%s is missing: the run is unfinished or failed, data may be partial", complete)
    geometry = geometry_from_info(json.loads((mounts[JPEG_PATH] / INFO).read_bytes()))

    neuroglancer = _import_neuroglancer()
    data_server = DataServer(mounts, port=data_port)
    try:
        layers = [(name, layer_source(data_server.url, prefix)) for name, _, prefix in volumes]
        options = _layer_options(run_id, count)
        if RAW_OME_ZARR_PATH in mounts:
            array_json = mounts[RAW_OME_ZARR_PATH] / dataset_path(0) / ZARR_JSON
            options.update(
                ome_zarr_layer(
                    run_id, layers[-1][1], array_json.read_bytes(), geometry.resolution_nm
                )
            )
        state = viewer_state(layers, geometry, layout, options)
        neuroglancer.set_server_bind_address("127.0.0.1", bind_port=port)
        viewer = neuroglancer.Viewer()
        with viewer.txn() as s:
            s.dimensions = neuroglancer.CoordinateSpace(json=state["dimensions"])
            for layer in state["layers"]:
                image_layer = neuroglancer.ImageLayer(source=layer["source"])
                for key in ("shader", "blend", "opacity"):
                    if key in layer:
                        setattr(image_layer, key, layer[key])
                s.layers.append(name=layer["name"], layer=image_layer)
            s.selected_layer.layer = state["selectedLayer"]["layer"]
            s.position = state["position"]
            s.cross_section_scale = state["crossSectionScale"]
            s.projection_scale = state["projectionScale"]
            s.layout = layout
        url = str(viewer.get_viewer_url())
        parts = urllib.parse.urlsplit(url)
        data_server.allow_origin(f"{parts.scheme}://{parts.netloc}")
    except BaseException:
        data_server.stop()
        raise
    log.info("viewer for %s at %s (data from %s)", run_id, url, data_server.url)
    return ViewSession(url, f"{data_server.url}/{JPEG_PATH}", data_server, viewer)
