#!/usr/bin/env python3
"""Write a small, already aligned RGB(A) image stack as a neuroglancer precomputed volume.

Reads the slices SRC/TEMPLATE % z for z = minz..maxz (8-bit PNG or TIFF, 3 or 4
channels, all the same size), writes one unsharded raw uint8 scale with 3 or 4
channels to DEST through tensorstore, and prints a neuroglancer image layer (JSON)
whose shader shows the first three channels as colour. Slice z lands at voxel z,
so coordinates in the viewer are slice numbers. SRC and DEST are folders,
file:// URLs or gs://BUCKET/PATH (under EMPROCESS_STORAGE_ROOT when set).

For large grayscale stacks use the pipeline; this tool keeps one slab of
chunk-z slices in memory and writes no downsampled scales.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emprocess import storage
from emprocess.errors import EmprocessError, InvalidInput, NotFound
from emprocess.view import RGB_SHADER  # the shader `emprocess view` gives colour runs

if TYPE_CHECKING:
    import numpy as np

# numpy, OpenCV and tensorstore are imported where used, so --help and argument
# errors answer at once.

log = logging.getLogger("ingest_multichannel_small")

DEFAULT_CHUNK_XYZ = (256, 256, 16)
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (3, palette: decoded)


@dataclass(frozen=True)
class SliceInfo:
    """One slice: its number, URL, and what its header says (channels None: unknown)."""

    z: int
    url: str
    width: int
    height: int
    channels: int | None


# -- finding and checking slices ---------------------------------------------------

_INT_FIELD = re.compile(r"(%%|%[-#0 +]*\d*[hlL]?[diu])")


def template_regex(template: str) -> re.Pattern[str]:
    """A regex matching the names ``template % z`` can give; group 1 is the number."""
    from emprocess.workflow.conf import check_template

    try:
        check_template(template)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    out = []
    for part in _INT_FIELD.split(template):
        if part == "%%":
            out.append("%")
        elif _INT_FIELD.fullmatch(part):
            out.append(r"(\d+)")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def find_slices(src: str, template: str) -> list[int]:
    """The numbers z of the slices named ``template % z`` directly in ``src``, sorted."""
    pattern = template_regex(template)
    prefix = storage.parse_url(src.rstrip("/") + "/", allow_empty_key=True).key
    zs = []
    for key in storage.list_keys(src.rstrip("/") + "/"):
        name = key[len(prefix) :]
        m = pattern.fullmatch(name)
        if m and template % int(m.group(1)) == name:
            zs.append(int(m.group(1)))
    if not zs:
        raise NotFound(f"no slice named like {template!r} in {src}")
    return sorted(zs)


def choose_range(
    src: str, template: str, minz: int | None, maxz: int | None, found: list[int]
) -> tuple[int, int]:
    """minz and maxz, the missing ones taken from the slices found; no gap may lie between."""
    minz = found[0] if minz is None else minz
    maxz = found[-1] if maxz is None else maxz
    if maxz < minz:
        raise InvalidInput(
            f"need minz <= maxz, got minz={minz} maxz={maxz} (slices found: "
            f"z={found[0]}..{found[-1]})"
        )
    missing = sorted(set(range(minz, maxz + 1)) - set(found))
    if missing:
        raise InvalidInput(
            f"slice {template % missing[0]!r} (z={missing[0]}) is missing in {src}, between "
            f"z={minz} and z={maxz}; {len(missing)} missing in all "
            "(give --minz/--maxz to ingest a gap-free part)"
        )
    return minz, maxz


def read_slice_info(z: int, url: str) -> SliceInfo:
    """Size and (for PNG) channel count of one slice, from its first bytes."""
    from emprocess.imageinfo import HEADER_BYTES, PNG_SIGNATURE, UnreadableHeader, image_size_xy

    try:
        header = storage.read_bytes(url, 0, HEADER_BYTES)
    except NotFound:
        raise NotFound(f"slice z={z} not found: {url}") from None
    try:
        width, height = image_size_xy(
            header, lambda start, end: storage.read_bytes(url, start, end)
        )
    except UnreadableHeader as e:
        raise InvalidInput(f"slice {url}: {e}") from None
    channels = None
    if header.startswith(PNG_SIGNATURE):
        bit_depth, colour_type = header[24], header[25]
        if bit_depth != 8:
            raise InvalidInput(f"slice {url} has {bit_depth}-bit samples; only 8-bit is supported")
        channels = PNG_CHANNELS.get(colour_type)
    return SliceInfo(z, url, width, height, channels)


def check_slices(infos: Sequence[SliceInfo]) -> tuple[int, int, int | None]:
    """(width, height, channels) shared by all slices, or InvalidInput naming the first odd one."""
    first = infos[0]
    for info in infos:
        if (info.width, info.height) != (first.width, first.height):
            raise InvalidInput(
                f"slice {info.url} is {info.width}x{info.height} px but slice {first.url} is "
                f"{first.width}x{first.height}; all slices must be the same size"
            )
        if info.channels is not None and info.channels not in (3, 4):
            raise InvalidInput(
                f"slice {info.url} has {info.channels} channel(s); expected 3 (RGB) or 4 (RGBA)"
            )
    known = {i.channels for i in infos if i.channels is not None}
    if len(known) > 1:
        odd = next(i for i in infos if i.channels != first.channels and i.channels is not None)
        raise InvalidInput(
            f"slice {odd.url} has {odd.channels} channels but slice "
            f"{next(i.url for i in infos if i.channels is not None)} has "
            f"{min(known - {odd.channels})}; all slices must have the same channels"
        )
    return first.width, first.height, (known.pop() if known else None)


def decode_rgb(data: bytes, url: str) -> np.ndarray:
    """Decode one slice to a (height, width, channels) uint8 array in RGB(A) order."""
    import numpy as np

    from emprocess.images import decode_image  # the pipeline's decoder, RGB(A) order

    image = decode_image(data, url, channels="all")
    if image.dtype != np.uint8:
        raise InvalidInput(f"slice {url} has pixel type {image.dtype}; only 8-bit is supported")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise InvalidInput(f"slice {url} has {channels} channel(s); expected 3 (RGB) or 4 (RGBA)")
    return image


# -- writing ---------------------------------------------------------------------


def volume_spec(
    dest: str,
    size_xyz: tuple[int, int, int],
    voxel_offset_xyz: tuple[int, int, int],
    channels: int,
    resolution_nm: tuple[float, float, float],
    chunk_xyz: tuple[int, int, int],
    overwrite: bool,
) -> dict[str, Any]:
    """The tensorstore spec of the volume: one raw, unsharded uint8 scale."""
    chunk = [max(1, min(c, s)) for c, s in zip(chunk_xyz, size_xyz, strict=True)]
    spec: dict[str, Any] = {
        "driver": "neuroglancer_precomputed",
        "kvstore": storage.kvstore_spec(dest),
        "multiscale_metadata": {
            "type": "image",
            "data_type": "uint8",
            "num_channels": channels,
        },
        "scale_metadata": {
            "size": list(size_xyz),
            "voxel_offset": list(voxel_offset_xyz),
            "resolution": list(resolution_nm),
            "encoding": "raw",
            "chunk_size": chunk,
        },
        "create": True,
    }
    if overwrite:
        spec["delete_existing"] = True
    else:
        spec["open"] = True
    return spec


def ingest(
    src: str,
    dest: str,
    template: str,
    minz: int | None,
    maxz: int | None,
    resolution_nm: tuple[float, float, float],
    chunk_xyz: tuple[int, int, int] = DEFAULT_CHUNK_XYZ,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Check every slice, then write the volume slab by slab; returns a summary."""
    if minz is None or maxz is None:
        minz, maxz = choose_range(src, template, minz, maxz, find_slices(src, template))
    else:
        template_regex(template)  # validates the template
    if minz < 0 or maxz < minz:
        raise InvalidInput(f"need 0 <= minz <= maxz, got minz={minz} maxz={maxz}")
    infos = [read_slice_info(z, storage.join(src, template % z)) for z in range(minz, maxz + 1)]
    width, height, channels = check_slices(infos)
    if channels is None:  # no PNG header told: decode the first slice to find out
        channels = decode_rgb(storage.read_bytes(infos[0].url), infos[0].url).shape[2]
    import numpy as np
    import tensorstore as ts  # after the checks: a bad stack fails fast

    depth = maxz - minz + 1
    spec = volume_spec(
        dest,
        (width, height, depth),
        (0, 0, minz),
        channels,
        resolution_nm,
        chunk_xyz,
        overwrite,
    )
    try:
        volume = ts.open(spec).result()
    except ValueError as e:
        reason = str(e).split(" [tensorstore_spec=")[0]  # the spec repeats what we asked for
        raise InvalidInput(
            f"cannot create the volume at {dest}: {reason} "
            "(a different volume there? --overwrite replaces it)"
        ) from None
    slab_z = spec["scale_metadata"]["chunk_size"][2]
    for start in range(0, depth, slab_z):
        part = infos[start : start + slab_z]
        slab = np.empty((len(part), height, width, channels), np.uint8)
        for i, info in enumerate(part):
            image = decode_rgb(storage.read_bytes(info.url), info.url)
            if image.shape != slab.shape[1:]:
                raise InvalidInput(
                    f"slice {info.url} decodes to {image.shape[1]}x{image.shape[0]} px with "
                    f"{image.shape[2]} channels; expected {width}x{height} with {channels}"
                )
            slab[i] = image
        z0 = part[0].z
        volume[:, :, z0 : z0 + len(part), :].write(slab.transpose(2, 1, 0, 3)).result()
        log.info("wrote z=%d..%d of %d..%d", z0, z0 + len(part) - 1, minz, maxz)
    return {
        "size_xyz": [width, height, depth],
        "minz": minz,
        "maxz": maxz,
        "channels": channels,
        "chunk_xyz": spec["scale_metadata"]["chunk_size"],
    }


# -- viewing ---------------------------------------------------------------------


def layer_source(dest: str) -> str:
    """The neuroglancer source URL of DEST (gs:// as is; a local folder as file://)."""
    loc = storage.parse_url(dest.rstrip("/"), allow_empty_key=True)
    return f"precomputed://{loc.url.rstrip('/')}"


def image_layer(dest: str, name: str) -> dict[str, Any]:
    """A neuroglancer image layer showing the volume at DEST in colour."""
    return {"type": "image", "name": name, "source": layer_source(dest), "shader": RGB_SHADER}


def viewer_state(
    layer: dict[str, Any], resolution_nm: Sequence[float], summary: dict[str, Any]
) -> dict[str, Any]:
    """A whole neuroglancer state: nm dimensions, centred on the volume, with ``layer``."""
    w, h, d = summary["size_xyz"]
    return {
        "dimensions": {ax: [r * 1e-9, "m"] for ax, r in zip("xyz", resolution_nm, strict=True)},
        "position": [w / 2, h / 2, summary["minz"] + d / 2],
        "layout": "xy",
        "layers": [layer],
    }


# -- command line --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, ingest, print the layer; 0 ok, 1 failed, 2 bad arguments."""
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="folder, file:// or gs:// URL of the slices")
    parser.add_argument("dest", metavar="DEST", help="folder, file:// or gs:// URL of the volume")
    parser.add_argument(
        "--resolution",
        type=float,
        nargs="+",
        required=True,
        metavar="NM",
        help="voxel size in nm: one number (isotropic) or three (x y z)",
    )
    parser.add_argument(
        "--template",
        default="img.%05d.png",
        help="printf template of the slice names (default: %(default)s)",
    )
    parser.add_argument("--minz", type=int, help="first slice (default: the first found)")
    parser.add_argument("--maxz", type=int, help="last slice, inclusive (default: the last found)")
    parser.add_argument(
        "--chunk",
        type=int,
        nargs=3,
        default=list(DEFAULT_CHUNK_XYZ),
        metavar=("X", "Y", "Z"),
        help="chunk size in voxels (default: %(default)s)",
    )
    parser.add_argument("--name", help="layer name (default: the last part of DEST)")
    parser.add_argument(
        "--state",
        action="store_true",
        help="print a whole viewer state (dimensions, position, the layer), not just the layer",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a volume already at DEST")
    args = parser.parse_args(argv)
    if len(args.resolution) not in (1, 3) or min(args.resolution) <= 0:
        parser.error(f"--resolution needs 1 or 3 numbers > 0, got {args.resolution}")
    res = args.resolution * 3 if len(args.resolution) == 1 else args.resolution
    resolution = (res[0], res[1], res[2])
    if min(args.chunk) < 1:
        parser.error(f"--chunk sizes must be >= 1, got {args.chunk}")
    for opt in ("minz", "maxz"):
        if getattr(args, opt) is not None and getattr(args, opt) < 0:
            parser.error(f"--{opt} must be >= 0, got {getattr(args, opt)}")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        summary = ingest(
            args.src,
            args.dest,
            args.template,
            args.minz,
            args.maxz,
            resolution,
            (args.chunk[0], args.chunk[1], args.chunk[2]),
            args.overwrite,
        )
    except EmprocessError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    name = args.name or args.dest.rstrip("/").rsplit("/", 1)[-1] or "rgb"
    layer = image_layer(args.dest, name)
    print(
        f"wrote {summary['size_xyz'][0]}x{summary['size_xyz'][1]}x{summary['size_xyz'][2]} "
        f"voxels, {summary['channels']} channels, z={summary['minz']}..{summary['maxz']} "
        f"to {args.dest}",
        file=sys.stderr,
    )
    if not layer["source"].startswith("precomputed://gs://"):
        print(
            "note: neuroglancer cannot read file:// sources; serve the folder over HTTP "
            "(with CORS) and use precomputed://http://HOST:PORT/... as the source",
            file=sys.stderr,
        )
    out = viewer_state(layer, resolution, summary) if args.state else layer
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
