"""Neuroglancer viewer state and links of a run's volumes: layers, shaders, dimensions."""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emprocess.errors import InvalidInput
from emprocess.kernels.omezarr import ZARR_JSON
from emprocess.layout import (
    JPEG_PATH,
    RAW_OME_ZARR_PATH,
    RAW_PATH,
    RunLayout,
    jpeg_channel_path,
)
from emprocess.models import MAX_CHANNELS
from emprocess.volume import info_key

NEUROGLANCER_APP = "https://neuroglancer-demo.appspot.com/"
DEFAULT_RESOLUTION_NM = 8.0
OVERVIEW_PX = 512  # screen pixels a section should fit in when a view opens
PROJECTION_MARGIN = 1.5  # 3D view height / the volume's largest extent


def ng_bucket(source: str, run_id: str) -> str:
    """SOURCE_ng_RUN_ID: the bucket of the JPEG pyramid."""
    return RunLayout(source, run_id).ng


def chunk_bucket(source: str, run_id: str) -> str:
    """SOURCE_chunk_RUN_ID: the bucket of the lossless pyramid."""
    return RunLayout(source, run_id).chunk


def neuroglancer_source(source: str, run_id: str, raw: bool = False) -> str:
    """The neuroglancer layer source of a run's JPEG volume (or of its lossless one)."""
    layout = RunLayout(source, run_id)
    return f"precomputed://{layout.raw_url}" if raw else layout.neuroglancer_source()


def _volumes(
    source: str, run_id: str, raw: bool, jpeg_channels: int = 1, ome_zarr: bool = False
) -> list[tuple[str, str, str]]:
    """(layer name, bucket, key prefix) of each volume to show, JPEG first.

    Args:
        raw: show the precomputed lossless volume (layer RUN_ID-raw).
        ome_zarr: show the OME-Zarr lossless volume (layer RUN_ID-ome-zarr).
        jpeg_channels: how many JPEG volumes the run has: 1, or one per channel
            (``jpeg_channels`` "each": neuroglancer/jpeg and neuroglancer/jpeg_cC,
            shown as layers RUN_ID-cC).
    """
    ng = ng_bucket(source, run_id)
    if jpeg_channels == 1:
        out = [(run_id, ng, JPEG_PATH)]
    else:
        out = [(f"{run_id}-c{c}", ng, jpeg_channel_path(c)) for c in range(jpeg_channels)]
    if raw:
        out.append((f"{run_id}-raw", chunk_bucket(source, run_id), RAW_PATH))
    if ome_zarr:
        out.append((f"{run_id}-ome-zarr", chunk_bucket(source, run_id), RAW_OME_ZARR_PATH))
    return out


def metadata_key(prefix: str) -> str:
    """The object that says a volume exists: ``PREFIX/info``, or the OME-Zarr group's
    ``PREFIX/zarr.json``."""
    return f"{prefix}/{ZARR_JSON}" if prefix == RAW_OME_ZARR_PATH else info_key(prefix)


def layer_source(base_url: str, prefix: str) -> str:
    """The neuroglancer source of volume ``prefix`` under ``base_url`` (``gs://BUCKET`` or
    the data server's URL): ``precomputed://...``, or ``zarr3://.../`` for OME-Zarr."""
    if prefix == RAW_OME_ZARR_PATH:
        return f"zarr3://{base_url}/{prefix}/"
    return f"precomputed://{base_url}/{prefix}"


def ome_zarr_layer(
    run_id: str, source: str, array_json: bytes | None, resolution_nm: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Layer options of a colour OME-Zarr volume (scale 0's ``zarr.json`` is
    ``array_json``; None or grey: none).

    Neuroglancer makes an OME-Zarr ``c`` axis a local dimension (``c'``: one channel at
    a time, grey); the source's transform renames it ``c^``, a channel dimension, so the
    shader's ``getDataValue(i)`` reads channel i and draws the colour image.
    """
    try:
        array = json.loads(array_json) if array_json else {}
        names, shape = array.get("dimension_names") or [], array.get("shape") or []
        channels = int(shape[0]) if names[:1] == ["c"] else 1
    except (ValueError, TypeError, AttributeError, IndexError):
        channels = 1
    shader = channel_shader(channels) if 1 < channels <= MAX_CHANNELS else None
    if shader is None:
        return {}
    rx, ry, rz = (float(r) for r in resolution_nm)
    dims = {"c^": [1, ""], "z": [rz / 1e9, "m"], "y": [ry / 1e9, "m"], "x": [rx / 1e9, "m"]}
    layer_source = {"url": source, "transform": {"outputDimensions": dims}}
    return {f"{run_id}-ome-zarr": {"source": layer_source, "shader": shader}}


def raw_formats(has_volume: Callable[[str], bool]) -> tuple[bool, bool]:
    """(precomputed, OME-Zarr): the lossless volumes ``--raw`` shows, those that
    ``has_volume(prefix)`` finds; the precomputed one when neither is found (its absence
    is then reported)."""
    zarr = has_volume(RAW_OME_ZARR_PATH)
    return (not zarr) or has_volume(RAW_PATH), zarr


def _jpeg_channel_count(has_volume: Callable[[str], bool | None]) -> int:
    """How many JPEG volumes a run has: 1 + the channel volumes neuroglancer/jpeg_c1, ...
    that ``has_volume(path)`` finds (None: could not tell; counted as absent)."""
    count = 1
    while count < MAX_CHANNELS and has_volume(jpeg_channel_path(count)):
        count += 1
    return count


def _layer_options(run_id: str, jpeg_channels: int) -> dict[str, dict[str, Any]]:
    """With a JPEG volume per channel: each channel's layer in its colour, added up, and
    the lossless layer (all channels) in colour too."""
    if jpeg_channels == 1:
        return {}
    options = {f"{run_id}-c{c}": channel_layer(c) for c in range(jpeg_channels)}
    options[f"{run_id}-raw"] = {"shader": channel_shader(jpeg_channels)}
    options[f"{run_id}-ome-zarr"] = options[f"{run_id}-raw"]
    return options


# -- viewer state and links ----------------------------------------------------------


@dataclass(frozen=True)
class VolumeGeometry:
    """Scale 0 of a precomputed volume: voxel size (nm), size and offset (voxels), x, y, z."""

    resolution_nm: tuple[float, float, float]
    size_xyz: tuple[int, int, int]
    offset_xyz: tuple[int, int, int]
    num_channels: int = 1

    @property
    def centre_xyz(self) -> tuple[float, float, float]:
        """The volume's centre in scale-0 voxel coordinates (what neuroglancer's position is)."""
        c = [o + s / 2 for o, s in zip(self.offset_xyz, self.size_xyz, strict=True)]
        return c[0], c[1], c[2]


def geometry_from_info(info: Mapping[str, Any]) -> VolumeGeometry:
    """Read scale 0 of a precomputed ``info``.

    Raises:
        InvalidInput: the info has no usable scale 0 (naming what is wrong).
    """
    try:
        s0 = info["scales"][0]
        res = tuple(float(r) for r in s0["resolution"])
        size = tuple(int(v) for v in s0["size"])
        offset = tuple(int(v) for v in s0.get("voxel_offset", (0, 0, 0)))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise InvalidInput(f"info has no usable scale 0 ({type(e).__name__}: {e})") from None
    if len(res) != 3 or len(size) != 3 or len(offset) != 3:
        raise InvalidInput(
            f"info scale 0 must have 3 resolution/size/offset values, got {res}, {size}, {offset}"
        )
    if not all(math.isfinite(r) and r > 0 for r in res):
        raise InvalidInput(f"info scale 0 resolution must be > 0 nm, got {list(res)}")
    channels = info.get("num_channels", 1)
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise InvalidInput(f"info num_channels must be an integer >= 1, got {channels!r}")
    return VolumeGeometry(
        (res[0], res[1], res[2]),
        (size[0], size[1], size[2]),
        (offset[0], offset[1], offset[2]),
        channels,
    )


RGB_SHADER = """\
#uicontrol float brightness slider(min=-1, max=1, default=0)
#uicontrol float contrast slider(min=-3, max=3, default=0)
void main() {
  vec3 rgb = vec3(toNormalized(getDataValue(0)),
                  toNormalized(getDataValue(1)),
                  toNormalized(getDataValue(2)));
  emitRGB((rgb - 0.5) * exp(contrast) + 0.5 + brightness);
}
"""
"""Shows channels 0, 1, 2 as red, green, blue; a fourth (alpha) channel is kept but not drawn."""


CHANNEL_COLOURS = ("#ff0000", "#00ff00", "#0000ff", "#ffffff")
"""The colour of each channel's own layer (``jpeg_channels`` "each"): red, green, blue
(the RGB(A) order of the channels), and white for a fourth."""

CHANNEL_SHADER = """\
#uicontrol vec3 color color(default="{colour}")
#uicontrol float brightness slider(min=-1, max=1, default=0)
#uicontrol float contrast slider(min=-3, max=3, default=0)
void main() {{
  float v = (toNormalized(getDataValue()) - 0.5) * exp(contrast) + 0.5 + brightness;
  emitRGB(color * v);
}}
"""
"""One channel of a colour run in its colour; its layer is blended additively so the
channel layers add up to the colour image."""


def channel_layer(channel: int) -> dict[str, Any]:
    """Shader, blending and opacity of the layer of channel ``channel``'s own JPEG volume."""
    colour = CHANNEL_COLOURS[channel % len(CHANNEL_COLOURS)]
    return {"shader": CHANNEL_SHADER.format(colour=colour), "blend": "additive", "opacity": 1.0}


def channel_shader(num_channels: int) -> str | None:
    """The layer shader of a volume with ``num_channels`` channels; None: neuroglancer's
    default (grey) for one channel."""
    if num_channels == 1:
        return None
    if num_channels == 2:  # channel 0 grey-magenta, channel 1 green
        return RGB_SHADER.replace("getDataValue(2)", "getDataValue(0)")
    return RGB_SHADER


def viewer_state(
    layers: Sequence[tuple[str, str]],
    geometry: VolumeGeometry | None,
    layout: str = "4panel",
    layer_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Neuroglancer viewer state (JSON) showing image layers in nm at the volume's resolution.

    Args:
        layers: (name, source) of each image layer, bottom first; the last one is selected.
        geometry: scale 0 of the volume, for dimensions and the centre position; None
            uses ``DEFAULT_RESOLUTION_NM`` and leaves the position to neuroglancer.
        layout: neuroglancer layout, e.g. "4panel", "xy", "3d".
        layer_options: layer name -> JSON members (shader, blend, opacity) that replace
            the ones derived from ``geometry``.
    """
    if not layers:
        raise InvalidInput("a viewer state needs at least one layer")
    res = geometry.resolution_nm if geometry else (DEFAULT_RESOLUTION_NM,) * 3
    state: dict[str, Any] = {
        # JSON coordinate spaces are in base units: [scale, "m"]; r / 1e9 keeps 8e-09 exact.
        "dimensions": {name: [r / 1e9, "m"] for name, r in zip("xyz", res, strict=True)},
        "layers": [{"type": "image", "source": src, "name": name} for name, src in layers],
        "selectedLayer": {"layer": layers[-1][0]},
        "layout": layout,
    }
    shader = channel_shader(geometry.num_channels) if geometry else None
    if shader is not None:  # colour: every layer (the lossless one's first channels too)
        for layer in state["layers"]:
            layer["shader"] = shader
    for layer in state["layers"]:
        layer.update((layer_options or {}).get(layer["name"], {}))
    if geometry:
        state["position"] = list(geometry.centre_xyz)
        # Zoom out so a panel of ~OVERVIEW_PX screen pixels shows the whole section (never
        # beyond 1 voxel per pixel), and the 3D view the whole volume: large volumes open
        # on an overview read from the coarse scales instead of a tiny full-res patch.
        extent_xy = max(geometry.size_xyz[0], geometry.size_xyz[1])
        state["crossSectionScale"] = max(1.0, round(extent_xy / OVERVIEW_PX, 3))
        # In neuroglancer's canonical voxels (the smallest voxel side): with anisotropic
        # voxels (4 x 4 x 40 nm) the volume's longest side is the physically longest.
        extent_nm = [n * r for n, r in zip(geometry.size_xyz, res, strict=True)]
        state["projectionScale"] = float(PROJECTION_MARGIN * max(extent_nm) / min(res))
    return state


def neuroglancer_link(state: Mapping[str, Any], app_url: str = NEUROGLANCER_APP) -> str:
    """A neuroglancer link: the app's URL with the viewer state as JSON in the fragment."""
    text = json.dumps(state, separators=(",", ":"))
    # The characters neuroglancer itself leaves unescaped (neuroglancer.url_state).
    fragment = urllib.parse.quote(text, safe="~@#$&()*!+=:;,.?/'")
    return f"{app_url}#!{fragment}"
