"""The read side of /alignedslice: a slice's image file(s) in the source bucket.

Everything a request says about its slice is checked before the pixels are decoded: the
file's size (at most ``max_file_bytes``), its header (PNG, TIFF or JPEG; its sides within
the warp's), the canvas in proportion to it, and for a slice stored one grey file per
channel (``channel_imgs``) every file's header. The channels are then handed out one at
a time (:meth:`SourceSlice.take_plane`), each corrected (destreak, gain and offset), so
a slice of separate files holds one decoded channel in memory at a time.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.geometry import TILE_PX
from emprocess.imageinfo import HEADER_BYTES, ImageLayout, UnreadableHeader, image_layout
from emprocess.images import decode_image
from emprocess.kernels.correct import SliceCorrection, correct_slice
from emprocess.kernels.warp import MAX_SOURCE_SIDE_PX
from emprocess.models import AlignedSliceRequest
from emprocess.settings import ServiceEnv

# The canvas holds every slice after its transform: a little larger than one slice
# (drift, rotation). Each side may be at most this many times the slice's longer
# side, plus one tile; the bound keeps a request's work in proportion to its input.
MAX_CANVAS_RATIO = 4


def max_file_bytes(env: ServiceEnv) -> int:
    """Largest slice file read: an uncompressed TIFF of the largest decoded slice plus its
    header (``emwrite_max_image_bytes``: a 32768^2 8-bit or a 23170^2 16-bit grey slice;
    a 16384^2 16-bit RGBA PNG needs 2 GiB)."""
    return env.emwrite_max_image_bytes + (1 << 20)


def check_canvas(bbox: list[int], layout: ImageLayout, img: str) -> None:
    """The canvas ``bbox`` [width, height] must be in proportion to the slice.

    Each side at most ``MAX_CANVAS_RATIO`` x the slice's longer side + one tile (a turned
    slice keeps its longer side), and the area at most that of the square whose side is
    ``MAX_CANVAS_RATIO`` x the side of the slice's own square (sqrt(width x height)) +
    one tile: for a square slice both say the same; a 7936 x 1 px slice gets at most
    1380^2 px, not 32768^2, so a request's work stays in proportion to its input.
    """
    width, height = bbox
    longest = max(layout.width, layout.height)
    if max(width, height) > MAX_CANVAS_RATIO * longest + TILE_PX:
        raise InvalidInput(
            f"bbox {bbox} is more than {MAX_CANVAS_RATIO}x (+{TILE_PX} px) the "
            f"{layout.width}x{layout.height} slice {img}"
        )
    side = MAX_CANVAS_RATIO * math.isqrt(layout.width * layout.height) + TILE_PX
    if width * height > side * side:
        raise InvalidInput(
            f"bbox {bbox} has {width * height} pixels, more than the {side}^2 = {side * side} "
            f"allowed for the {layout.width}x{layout.height} slice {img} ({MAX_CANVAS_RATIO}x "
            f"the side of its square + {TILE_PX} px)"
        )


def _layout(data: bytes, url: str) -> ImageLayout:
    """The slice's header; another format than PNG, TIFF or JPEG is refused here."""
    try:
        return image_layout(data[:HEADER_BYTES], lambda start, end: data[start:end])
    except UnreadableHeader as e:
        raise InvalidInput(f"{url} is not a PNG, TIFF or JPEG image: {e}") from None


class SourceSlice:
    """The slice of one /alignedslice request, read and checked (its buckets checked first).

    Args:
        req: the request.
        env: the service settings (limits).
    """

    def __init__(self, req: AlignedSliceRequest, env: ServiceEnv) -> None:
        self.url = storage.bucket_url(req.dest, req.img)
        self.max_pixels = env.emwrite_max_pixels
        self.max_decoded = env.emwrite_max_image_bytes
        self.max_file = max_file_bytes(env)
        self.correction = SliceCorrection(req.destreak, *(req.intensity_gain_offset or (1.0, 0.0)))
        data = storage.read_bytes(self.url, max_bytes=self.max_file)
        layout = _layout(data, self.url)
        if max(layout.width, layout.height) > MAX_SOURCE_SIDE_PX:  # before decoding it
            raise InvalidInput(
                f"{self.url} is {layout.width}x{layout.height} px; the warp takes slices of "
                f"at most {MAX_SOURCE_SIDE_PX} px a side (OpenCV's int16 source coordinates)"
            )
        check_canvas(req.bbox, layout, req.img)
        self._data = b""
        self._planes: list[np.ndarray] = []
        self.files = [self.url]
        if req.channel_imgs is not None:
            self.files = _check_channel_files(req, self.url, layout)
            self._data = data  # channel 0's file, decoded when taken
        else:
            image = decode_image(data, self.url, self.max_pixels, self.max_decoded, req.channels)
            del data
            planes = [image] if image.ndim == 2 else [image[:, :, c] for c in range(image.shape[2])]
            del image  # the planes keep it; each is dropped once rendered
            self._planes = [correct_slice(p, self.correction) for p in planes]

    def first_plane(self) -> np.ndarray:
        """Channel 0's plane of a slice of one file, left in place (before any is taken)."""
        return self._planes[0]

    def take_plane(self, c: int) -> np.ndarray:
        """Channel ``c``'s plane, corrected. Channels are taken in order, each once: the
        slice then holds none of it (a file per channel is read and decoded now)."""
        if self._planes:
            return self._planes.pop(0)
        data = self._data if c == 0 else storage.read_bytes(self.files[c], max_bytes=self.max_file)
        self._data = b""
        return correct_slice(
            decode_image(data, self.files[c], self.max_pixels, self.max_decoded, 1),
            self.correction,
        )


def _check_channel_files(req: AlignedSliceRequest, first_url: str, first: ImageLayout) -> list[str]:
    """URLs of every channel's file of a slice stored one grey file per channel, each
    checked by its header (grey, the size and bit depth of the first) before any is
    read whole: the files are then read and decoded one at a time."""
    assert req.channel_imgs is not None
    found = [(first_url, first)]
    for img in req.channel_imgs:
        url = storage.bucket_url(req.dest, img)
        try:
            layout = image_layout(
                storage.read_bytes(url, 0, HEADER_BYTES), functools.partial(storage.read_bytes, url)
            )
        except UnreadableHeader as e:
            raise InvalidInput(f"{url} is not a PNG, TIFF or JPEG image: {e}") from None
        found.append((url, layout))
    for url, layout in found:
        if layout.file_channels != 1:
            raise InvalidInput(
                f"{url} has {layout.file_channels} channels; a slice stored one file per "
                "channel needs a grey file for each"
            )
        if (layout.width, layout.height, layout.sample_bytes) != (
            first.width,
            first.height,
            first.sample_bytes,
        ):
            raise InvalidInput(
                f"channel file {url} is {layout.width}x{layout.height} px, "
                f"{8 * layout.sample_bytes}-bit, but {first_url} is {first.width}x"
                f"{first.height} px, {8 * first.sample_bytes}-bit"
            )
    return [url for url, _ in found]
