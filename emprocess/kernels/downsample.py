"""2x mean downsampling of (z, y, x) blocks, the step between pyramid scales; thumbnails."""

from __future__ import annotations

import cv2
import numpy as np

from emprocess.errors import InvalidInput

# Input z planes handled per pass: bounds the temporaries to a few times
# _Z_BATCH * y * x bytes (16 MiB for 1024 x 1024 planes) and keeps them cache-friendly.
_Z_BATCH = 16

# Accumulator wide enough for 8 summands of each input dtype.
_ACCUMULATOR: dict[np.dtype, np.dtype] = {
    np.dtype(np.uint8): np.dtype(np.uint16),
    np.dtype(np.uint16): np.dtype(np.uint32),
}


def downsampled_shape(shape: tuple[int, ...], downsample_z: bool = True) -> tuple[int, ...]:
    """Shape ``downsample_mean_2x`` returns: ceil(n / 2) on every reduced axis."""
    if len(shape) == 2:
        return ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    z, y, x = shape
    return ((z + 1) // 2 if downsample_z else z, (y + 1) // 2, (x + 1) // 2)


def downsample_mean_2x(volume: np.ndarray, downsample_z: bool = True) -> np.ndarray:
    """Mean over 2x2x2 (or 2x2) blocks, rounding half up, for uint8 and uint16.

    An axis of odd length n gives ceil(n / 2) outputs; the last one averages only the
    voxels that exist (e.g. 2 or 4 voxels, not 8). Internally the last voxel of an odd
    axis counts twice, which multiplies every existing voxel of such a block by the same
    factor and so gives exactly the mean of the existing voxels, rounding included:
    ``out = floor(sum / count + 1/2)`` with integer arithmetic ``(sum + count // 2) // count``.

    Half up rather than half to even keeps the arithmetic to one add and one shift; its
    bias (+1/16 grey level on average for 8 summands) is far below the JPEG error. A
    volume of one constant value stays constant at every scale.

    Args:
        volume: shape (z, y, x), or (y, x) for a single image; uint8 or uint16.
        downsample_z: False reduces only y and x (2x2 mean) of a (z, y, x) volume.

    Returns:
        Array of ``downsampled_shape(volume.shape, downsample_z)`` and the input dtype.

    Raises:
        InvalidInput: another dtype or rank, or an empty axis.
    """
    vol = np.asarray(volume)
    if vol.dtype not in _ACCUMULATOR:
        raise InvalidInput(f"downsampling supports uint8 and uint16, got {vol.dtype}")
    if vol.ndim == 2:
        return downsample_mean_2x(vol[None], downsample_z=False)[0]
    if vol.ndim != 3:
        raise InvalidInput(f"volume must be (z, y, x) or (y, x), got shape {vol.shape}")
    if min(vol.shape) < 1:
        raise InvalidInput(f"volume has an empty axis: shape {vol.shape}")

    acc = _ACCUMULATOR[vol.dtype]
    shift = 3 if downsample_z else 2
    out = np.empty(downsampled_shape(vol.shape, downsample_z), dtype=vol.dtype)
    # Batches hold an even number of planes so that z pairs never straddle two batches.
    for zin in range(0, vol.shape[0], _Z_BATCH):
        block = vol[zin : zin + _Z_BATCH]
        # Reduce z first: its pairs are whole contiguous planes, the cheapest step, and
        # it halves the data the strided y and x steps have to touch.
        s = _pair_sum(block, 0, acc) if downsample_z else block.astype(acc)
        s = _pair_sum(s, 1, acc)
        s = _pair_sum(s, 2, acc)
        s += 1 << (shift - 1)
        s >>= shift
        zout = zin // 2 if downsample_z else zin
        out[zout : zout + s.shape[0]] = s
    return out


def _pair_sum(a: np.ndarray, axis: int, acc: np.dtype) -> np.ndarray:
    """Sum of neighbour pairs along ``axis`` in dtype ``acc``; an odd last element counts twice."""
    n = a.shape[axis]
    m = n // 2
    shape = list(a.shape)
    shape[axis] = (n + 1) // 2
    out = np.empty(shape, dtype=acc)

    def along(s: slice) -> tuple[slice, ...]:
        return (slice(None),) * axis + (s,)

    np.add(
        a[along(slice(0, 2 * m, 2))],
        a[along(slice(1, 2 * m, 2))],
        out=out[along(slice(0, m))],
        dtype=acc,
    )
    if n % 2:
        np.multiply(a[along(slice(n - 1, n))], 2, out=out[along(slice(m, m + 1))], dtype=acc)
    return out


def shrink_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each ``factor`` x ``factor`` block of a 2-D image (thumbnails).

    Shape ``(ceil(h / factor), ceil(w / factor))``; the blocks of the last row and
    column average the pixels that exist. Every piece goes through OpenCV's
    ``INTER_AREA`` with an integer scale, its fast path: asked for the ceil size of
    the whole image instead, OpenCV resamples at a slightly non-integer scale and was
    7x slower (15.6 vs 2.2 ms for a 2168 x 2131 canvas at factor 2 and 4). Rounds as
    OpenCV does (to nearest; ties may go either way).
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0:
        raise InvalidInput(f"image must be a non-empty 2-D array, got shape {img.shape}")
    if factor < 1:
        raise InvalidInput(f"factor must be >= 1, got {factor}")
    h, w = img.shape
    hf, wf = h // factor * factor, w // factor * factor
    out = np.empty((-(-h // factor), -(-w // factor)), img.dtype)
    for ys, oy in (
        (slice(0, hf), slice(0, hf // factor)),
        (slice(hf, h), slice(hf // factor, None)),
    ):
        for xs, ox in (
            (slice(0, wf), slice(0, wf // factor)),
            (slice(wf, w), slice(wf // factor, None)),
        ):
            piece = img[ys, xs]
            if piece.size:
                target = out[oy, ox]
                target[...] = cv2.resize(
                    piece, (target.shape[1], target.shape[0]), interpolation=cv2.INTER_AREA
                )
    return out


def downsample_mean_steps(volume: np.ndarray, step_zyx: tuple[int, int, int]) -> np.ndarray:
    """Mean over blocks of ``step_zyx`` voxels, each step 1 or 2: one anisotropic pyramid step.

    Rounds and treats odd axes as :func:`downsample_mean_2x` does (which this calls for
    the 2x2x2 and 1x2x2 steps, the common ones); an axis of step 1 is kept as it is.

    Args:
        volume: (z, y, x) uint8 or uint16.
        step_zyx: the shrink factor per axis, 1 or 2.

    Returns:
        Shape ceil(n / step) per axis, the input dtype.
    """
    if any(s not in (1, 2) for s in step_zyx):
        raise InvalidInput(f"pyramid steps must be 1 or 2 per axis, got {step_zyx}")
    if step_zyx[1:] == (2, 2):
        return downsample_mean_2x(volume, downsample_z=step_zyx[0] == 2)
    vol = np.asarray(volume)
    if vol.dtype not in _ACCUMULATOR or vol.ndim != 3 or min(vol.shape) < 1:
        raise InvalidInput(
            f"volume must be a non-empty (z, y, x) uint8 or uint16 array, got {vol.shape} {vol.dtype}"
        )
    acc = _ACCUMULATOR[vol.dtype]
    shift = sum(s == 2 for s in step_zyx)
    if shift == 0:
        return vol.copy()
    shape = tuple(-(-n // s) for n, s in zip(vol.shape, step_zyx, strict=True))
    out = np.empty(shape, dtype=vol.dtype)
    for zin in range(0, vol.shape[0], _Z_BATCH):
        s = vol[zin : zin + _Z_BATCH].astype(acc)
        for axis, step in enumerate(step_zyx):
            if step == 2:
                s = _pair_sum(s, axis, acc)
        s += 1 << (shift - 1)
        s >>= shift
        zout = zin // step_zyx[0]
        out[zout : zout + s.shape[0]] = s
    return out
