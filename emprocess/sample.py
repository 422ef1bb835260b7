"""Synthetic FIB-SEM stacks of brain-like tissue with a known slice-to-slice drift.

A stack is rendered in two steps. First, a 3D "world" volume is drawn one
z-section at a time in world pixels (8 nm isotropic voxels, so one slice is one
pixel in z): neurites are the cells of a Voronoi tessellation whose seeds move
slowly with z, with rounded corners, dark membranes and a darker extracellular
space; mitochondria are ellipsoids and vesicles are spheres attached to a cell,
so their cross-sections grow, shrink and travel with it. Second, slice ``z`` is
sampled from its world section through a known affine ``A_z`` (slice pixels ->
world pixels) and gets detector noise. ``A_{z+1} = A_z D_z`` with a small random
drift ``D_z``, so ``D_z = A_z^-1 A_{z+1}`` maps pixels of slice z+1 ("post") onto
pixels of slice z ("pre"): exactly what an alignment of the pair should find.

All transforms follow :mod:`emprocess.affine`. The output for a given seed and
size does not depend on ``n_slices``: slice ``i`` of a short stack equals slice
``i`` of a long one, and a stack is produced slice by slice in bounded memory.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from emprocess import affine
from emprocess.errors import InvalidInput

logger = logging.getLogger(__name__)

MIN_SIZE_PX = 64
MAX_SIZE_PX = 8192
MAX_SLICES = 1_000_000
DEFAULT_TEMPLATE = "img.%05d.png"
TRUTH_NAME = "truth.json"
CONVENTION = (
    "emprocess.affine: 6 numbers [m00, m10, m01, m11, m02, m12] (mpicbg order), pixel "
    "centres at integer coordinates; pairs[z] maps pixels of slice z+1 onto slice z; "
    "world[z] maps pixels of slice z into the synthetic world volume"
)

# Independent random streams, so adding a feature to one leaves the others unchanged.
_STREAM_CELLS, _STREAM_DRIFT, _STREAM_OBJECTS, _STREAM_FIELDS, _STREAM_NOISE = range(5)

_Z_BLOCK = 64  # slices per block of organelles; no organelle reaches further than one block
_GRAIN_EVERY = 6  # slices between independent grain textures (blended in between)
_SHADING_EVERY = 48  # slices between independent slow shading fields
_LABEL_FACTOR = 2  # cells are tessellated at half resolution: 4x cheaper, edges stay smooth
_REVERSION = 0.15  # fraction of the accumulated drift pulled back per slice
_BASE = 178.0  # grey level of cytoplasm; the real 8 nm stacks have it near 170-190
_GAP_PX = 1.0  # half the extracellular gap between touching cells, px
_ROUND_PX = (3.0, 7.0, 12.0)  # corner radii of small, medium and large profiles, px
_ROUND_CLASS_SPACING = (38.0, 65.0)  # cell spacing (px) where the next radius class starts
_SIGNED_MIN, _SIGNED_STEP = -16.0, 0.25  # 8-bit code of the signed distance to cell edges, px
_GRAIN_STD = 14.0  # fine tissue texture, grey levels
_GRAIN_PX = 1.8  # its grain size (Gaussian sigma), px
_NOISE_SIGMA = 5.0  # detector noise, grey levels; with the grain, pixel differences match real data
_MAX_SEGMENT = 1.2  # longest seed segment, in units of the local cell spacing


@dataclass(frozen=True)
class Drift:
    """Limits of the random drift ``D_z`` between consecutive slices.

    Attributes:
        max_shift_px: bound on ``|dx|`` and ``|dy|``, the displacement in pixels of
            the centre of slice z+1 when mapped onto slice z.
        max_rotation_deg: bound on the rotation of one step, in degrees.
        max_scale: bound on ``|s - 1|`` for the isotropic scale ``s`` of one step.
        max_shear: bound on the shear term of one step (dimensionless).

    The accumulated drift is mean-reverting and never takes a slice outside its
    world; its translation stays within ``3 * max_shift_px`` of the start.
    """

    max_shift_px: float = 20.0
    max_rotation_deg: float = 0.5
    max_scale: float = 0.003
    max_shear: float = 0.003

    def __post_init__(self) -> None:
        for name, upper in (
            ("max_shift_px", 200.0),
            ("max_rotation_deg", 5.0),
            ("max_scale", 0.05),
            ("max_shear", 0.05),
        ):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and 0.0 <= value <= upper):
                raise InvalidInput(f"drift {name} must be within [0, {upper}], got {value!r}")

    @property
    def max_offset_px(self) -> float:
        """Bound on ``|x|`` and ``|y|`` of the accumulated offset of the slice centre."""
        return 3.0 * self.max_shift_px


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInput(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise InvalidInput(f"{name} must be within [{low}, {high}], got {value!r}")
    return int(value)


def _validate(
    n_slices: int, width: int, height: int, seed: int, first_z: int, template: str
) -> None:
    _check_int("n_slices", n_slices, 1, MAX_SLICES)
    _check_int("width", width, MIN_SIZE_PX, MAX_SIZE_PX)
    _check_int("height", height, MIN_SIZE_PX, MAX_SIZE_PX)
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("first_z", first_z, 0, 10**9)
    try:
        names = {template % z for z in (first_z, first_z + 1)}
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"template must be a printf pattern of one integer, got {template!r}"
        ) from exc
    if len(names) != 2 or TRUTH_NAME in names or any("/" in n or not n for n in names):
        raise InvalidInput(
            f"template {template!r} must give a distinct file name (no '/') for each slice"
        )


def _rng(seed: int, stream: int, *key: int) -> np.random.Generator:
    # Keys are shifted so negative block numbers stay valid SeedSequence entropy.
    return np.random.default_rng([seed, stream, *(k + 2**31 for k in key)])


def _smooth_field(
    rng: np.random.Generator, shape_hw: tuple[int, int], cell_px: float
) -> np.ndarray:
    """Zero-mean, unit-std random field with features about ``cell_px`` wide, (h, w) float32."""
    h, w = shape_hw
    gh, gw = max(2, round(h / cell_px) + 2), max(2, round(w / cell_px) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _world_margin_px(width: int, height: int, drift: Drift) -> int:
    """Pixels of world around the nominal slice so drift rarely hits the world's edge."""
    half_diag = 0.5 * math.hypot(width, height)
    linear = 3.0 * (math.radians(drift.max_rotation_deg) + drift.max_scale + drift.max_shear)
    return math.ceil(drift.max_offset_px + linear * half_diag) + 4


# --- drift -----------------------------------------------------------------------------------


def _drift_matrix(params: np.ndarray, c_xy: np.ndarray) -> np.ndarray:
    """3x3 affine ``T(c + d) R(angle) [[1 + scale, shear], [0, 1 + scale]] T(-c)``.

    Args:
        params: (5,) ``[dx, dy, angle, scale, shear]``; d in px, angle in radians.
        c_xy: (2,) the centre ``c`` (px), which the transform sends to ``c + d``.
    """
    dx, dy, angle, scale, shear = (float(v) for v in params)
    cos, sin = math.cos(angle), math.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1 + scale, shear], [0, 1 + scale]])
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = c_xy + np.array([dx, dy]) - linear @ c_xy
    return m


def _drift_params(m: np.ndarray, c_xy: np.ndarray) -> np.ndarray:
    """``[dx, dy, angle, scale, shear]`` of a 3x3 affine; inverts :func:`_drift_matrix`."""
    lin = m[:2, :2]
    d = lin @ c_xy + m[:2, 2] - c_xy
    angle = math.atan2(lin[1, 0], lin[0, 0])
    cos, sin = math.cos(angle), math.sin(angle)
    upper = np.array([[cos, sin], [-sin, cos]]) @ lin  # [[1 + scale, shear], [0, ~1 + scale]]
    return np.array([d[0], d[1], angle, upper[0, 0] - 1.0, upper[0, 1]])


def iter_world_transforms(
    n_slices: int, width: int, height: int, seed: int = 0, drift: Drift | None = None
) -> Iterator[np.ndarray]:
    """Yield ``A_i`` (3x3 float64, slice pixels -> world pixels) for i = 0 .. n_slices - 1.

    ``A_0`` puts the slice in the middle of the world; ``A_{i+1} = A_i D_i`` where
    the drift ``D_i`` stays within the limits of ``drift``. Each step pulls back a
    fraction of the accumulated offset, rotation, scale and shear (so the drift
    wanders but does not run away), and a step that would take a slice corner
    outside the world, or its centre beyond ``drift.max_offset_px``, is halved
    until it does not: any N is safe.
    """
    drift = drift or Drift()
    margin = _world_margin_px(width, height, drift)
    world_wh = np.array([width + 2 * margin - 1.0, height + 2 * margin - 1.0])
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    nominal = affine.to_homogeneous(affine.translation(margin, margin))
    nominal_inv = np.linalg.inv(nominal)
    # Pixel-edge corners of the slice: every pixel a bilinear sample touches is inside.
    corners = affine.corners_xy(width, height) - 0.5
    limits = np.array(
        [
            drift.max_shift_px,
            drift.max_shift_px,
            math.radians(drift.max_rotation_deg),
            drift.max_scale,
            drift.max_shear,
        ]
    )
    rng = _rng(seed, _STREAM_DRIFT)
    a = nominal
    for _ in range(n_slices):
        yield a.copy()
        noise = rng.uniform(-1.0, 1.0, 5) * limits
        error = nominal_inv @ a
        error_params = _drift_params(error, centre)
        pull = -_REVERSION * error_params
        # The error's offset is in world pixels; a step's shift is in slice pixels.
        pull[:2] = -_REVERSION * np.linalg.solve(error[:2, :2], error_params[:2])
        params = np.clip(pull + noise, -limits, limits)
        step = np.eye(3)
        for _halving in range(10):
            candidate = a @ _drift_matrix(params, centre)
            pts = affine.apply(affine.from_matrix(candidate), corners)
            offset = _drift_params(nominal_inv @ candidate, centre)[:2]
            inside = pts.min() >= 0.0 and bool(np.all(pts.max(axis=0) <= world_wh))
            if inside and np.abs(offset).max() <= drift.max_offset_px + 1e-9:
                step = _drift_matrix(params, centre)
                break
            params = params * 0.5
        a = a @ step


def _edge_luts() -> tuple[np.ndarray, np.ndarray]:
    """Look-up tables from the coded signed distance to the grey level of a section.

    A section is ``inside * cell_tone + edge``: ``inside`` fades from 1 to 0 over
    ~2 px across the cell edge (signed distance 0), and ``edge`` adds the
    extracellular grey outside and a dark Gaussian ridge, the membrane, on the edge.
    """
    signed = _SIGNED_MIN + np.arange(256) * _SIGNED_STEP
    outside = np.clip(0.5 + 0.5 * signed, 0.0, 1.0)
    edge = (_BASE - 72.0) * outside - 48.0 * np.exp(-((signed / 1.8) ** 2))
    return (1.0 - outside).astype(np.float32), edge.astype(np.float32)


_INSIDE_LUT, _EDGE_LUT = _edge_luts()


# --- the world ------------------------------------------------------------------------------


class _World:
    """The 3D tissue, rendered one z-section at a time; caches what neighbours share."""

    def __init__(self, width: int, height: int, seed: int, drift: Drift) -> None:
        margin = _world_margin_px(width, height, drift)
        self.w, self.h = width + 2 * margin, height + 2 * margin
        self.seed = seed
        self._init_cells()
        self._blocks: dict[int, dict[str, np.ndarray]] = {}
        self._grain: dict[int, np.ndarray] = {}

    def _init_cells(self) -> None:
        rng = _rng(self.seed, _STREAM_CELLS)
        w, h = self.w, self.h
        # Neurite sizes vary by region: spacing (~cell diameter) from 24 px (thin
        # axons) to 110 px (dendrites), drawn by thinning a dense uniform sample.
        min_sp, max_sp = 24.0, 110.0
        n_cand = int(w * h / min_sp**2) + 1
        xy = rng.uniform([0.0, 0.0], [w - 1.0, h - 1.0], (n_cand, 2))
        coarse_hw = (h // 8 + 1, w // 8 + 1)

        def at(field: np.ndarray, pts: np.ndarray) -> np.ndarray:
            return field[(pts[:, 1] // 8).astype(int), (pts[:, 0] // 8).astype(int)]

        level = np.clip(0.5 + 0.35 * at(_smooth_field(rng, coarse_hw, 300.0 / 8), xy), 0, 1)
        spacing = min_sp * (max_sp / min_sp) ** level
        keep = rng.random(n_cand) < (min_sp / spacing) ** 2
        keep[:2] = True  # a tessellation needs seeds, even in the smallest world
        self.home = xy[keep]
        self.spacing = spacing[keep]
        n = len(self.home)
        # Seeds wander on slow Lissajous paths: neurites run obliquely through z.
        self.amp = self.spacing[:, None] * rng.uniform(0.1, 0.4, (n, 2))
        self.period = rng.uniform(200.0, 800.0, (n, 2))
        self.phase = rng.uniform(0.0, 2 * math.pi, (n, 2))
        # Half the seeds are segments, not points, so their profiles are elongated, and
        # neighbours point roughly the same way, as in bundles of obliquely cut axons.
        self.seg_len = self.spacing * rng.uniform(0.0, _MAX_SEGMENT, n) * (rng.random(n) < 0.5)
        flow = _smooth_field(rng, coarse_hw, 400.0 / 8)
        self.seg_angle = 1.5 * at(flow, self.home) + rng.normal(0.0, 0.25, n)
        self.seg_turn = rng.uniform(-0.003, 0.003, n)
        tone = np.clip(rng.normal(0.0, 9.0, n), -22.0, 22.0)
        tone[rng.random(n) < 0.2] -= 35.0  # some darker neurites, as in real stacks
        self.tone = np.concatenate([[0.0], tone]).astype(np.float32)  # id 0 = no cell
        # Bigger profiles get rounder corners; class k rounds with _ROUND_PX[k].
        size_class = np.searchsorted(_ROUND_CLASS_SPACING, self.spacing)
        self.round_class = np.concatenate([[0], size_class]).astype(np.uint8)
        # A fixed, smooth displacement makes cell walls wavy instead of straight.
        # Applied on the half-resolution grid, in half-resolution pixels.
        f = _LABEL_FACTOR
        self.half_hw = (-(-h // f), -(-w // f))
        disp = [
            _smooth_field(rng, self.half_hw, 90.0 / f) * (6.0 / f)
            + _smooth_field(rng, self.half_hw, 25.0 / f) * (1.0 / f)
            for _ in "xy"
        ]
        xs, ys = np.meshgrid(
            np.arange(self.half_hw[1], dtype=np.float32),
            np.arange(self.half_hw[0], dtype=np.float32),
        )
        self._map1, self._map2 = cv2.convertMaps(xs + disp[0], ys + disp[1], cv2.CV_16SC2)

    def seed_xy(self, z: float) -> np.ndarray:
        """(n, 2) positions of the cell seeds at section z, world pixels."""
        pos = self.home + self.amp * np.sin(2 * math.pi * z / self.period + self.phase)
        # Mirror at the world's edges: clipping would pile seeds up on the edge and
        # grow fans of sliver cells; the amplitude is far below the world size.
        hi = np.array([self.w - 1.0, self.h - 1.0])
        pos = np.abs(pos)
        return hi - np.abs(hi - pos)

    def _cell_fields(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell geometry and shading of section z at full resolution, both (h, w) uint8.

        Returns:
            The signed distance to the nearest cell edge (> 0 outside cells), coded
            as ``(d - _SIGNED_MIN) / _SIGNED_STEP``, and the grey level each cell
            would have without membranes, grain and organelles.
        """
        f = _LABEL_FACTOR
        hh, wh = self.half_hw
        pos = self.seed_xy(z)
        ang = self.seg_angle + self.seg_turn * z
        # Rasterise each seed segment as points every half-res pixel along it.
        t = np.linspace(-0.5, 0.5, int(_MAX_SEGMENT * 110 / f) + 2)
        dx = (self.seg_len * np.cos(ang))[:, None] * t
        dy = (self.seg_len * np.sin(ang))[:, None] * t
        px = np.clip(np.rint((pos[:, :1] + dx - (f - 1) / 2) / f), 0, wh - 1).astype(np.intp)
        py = np.clip(np.rint((pos[:, 1:] + dy - (f - 1) / 2) / f), 0, hh - 1).astype(np.intp)
        ids = np.zeros((hh, wh), np.int32)
        ids[py.ravel(), px.ravel()] = np.repeat(np.arange(1, len(pos) + 1, dtype=np.int32), t.size)
        seeds = ids != 0
        _, labels = cv2.distanceTransformWithLabels(
            (~seeds).astype(np.uint8),
            cv2.DIST_L2,
            cv2.DIST_MASK_PRECISE,
            labelType=cv2.DIST_LABEL_PIXEL,
        )
        # DIST_LABEL_PIXEL numbers the seed pixels in raster order, from 1.
        cell = ids[seeds][labels - 1]
        edge = np.zeros((hh, wh), np.uint8)
        step = cell[:, 1:] != cell[:, :-1]
        edge[:, 1:] |= step
        edge[:, :-1] |= step
        step = cell[1:, :] != cell[:-1, :]
        edge[1:, :] |= step
        edge[:-1, :] |= step
        # Rounded profiles: open each cell (erode by gap + r, dilate by r) with r by cell
        # size. Per radius class, the distance to the dilated cores is the distance to
        # the eroded cores minus r; their minimum is a signed distance that stays
        # continuous where cells of different classes meet.
        to_edge = (cv2.distanceTransform(1 - edge, cv2.DIST_L2, cv2.DIST_MASK_5) + 0.5) * f
        round_class = self.round_class[cell]
        signed = np.full((hh, wh), np.inf, np.float32)
        for k, round_px in enumerate(_ROUND_PX):
            core = (to_edge >= _GAP_PX + round_px) & (round_class == k)
            if not core.any():
                continue
            to_core = cv2.distanceTransform((~core).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
            np.minimum(signed, to_core * f - round_px, out=signed)
        # Both are coded on 8 bits, rounded (+ 0.5: the casts truncate).
        coded = np.clip((signed - _SIGNED_MIN) / _SIGNED_STEP + 0.5, 0, 255).astype(np.uint8)
        tone = np.clip(self.tone[cell] + self._shading(z) + (_BASE + 0.5), 0, 255).astype(np.uint8)
        # Warp and upsample both fields together on 8 bits: 3x cheaper than float32 at
        # full resolution, and 1/4 px and 1 grey level steps vanish under the noise.
        packed = cv2.remap(
            cv2.merge([coded, tone]),
            self._map1,
            self._map2,
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        full = cv2.resize(packed, (wh * f, hh * f), interpolation=cv2.INTER_LINEAR)
        return full[: self.h, : self.w, 0], full[: self.h, : self.w, 1]

    def _block(self, b: int) -> dict[str, np.ndarray]:
        """Organelles centred in slices [b * 64, (b + 1) * 64); generated once per block."""
        if b not in self._blocks:
            rng = _rng(self.seed, _STREAM_OBJECTS, b)
            self._blocks[b] = {
                **self._mitochondria(rng, b * _Z_BLOCK),
                **self._vesicles(rng, b * _Z_BLOCK),
            }
            for old in [key for key in self._blocks if abs(key - b) > 2]:
                del self._blocks[old]
        return self._blocks[b]

    def _parents(self, rng: np.random.Generator, n: int, min_spacing: float) -> np.ndarray:
        """n cells of at least ``min_spacing`` px, chosen in proportion to their area."""
        big = np.flatnonzero(self.spacing >= min_spacing)
        if big.size == 0 or n == 0:
            return np.zeros(0, np.intp)
        area = self.spacing[big] ** 2
        return rng.choice(big, n, p=area / area.sum())

    def _mitochondria(self, rng: np.random.Generator, z0: int) -> dict[str, np.ndarray]:
        """Ellipsoids: half along z (roundish sections), half in the plane (long ones)."""
        par = self._parents(rng, rng.poisson(45 * self.w * self.h / 1e6), 40.0)
        n, sp = par.size, self.spacing[par]
        minor = np.clip(sp * rng.uniform(0.15, 0.3, n), 10.0, 40.0)
        along_z = rng.random(n) < 0.5
        elong = np.where(along_z, rng.uniform(1.0, 1.6, n), rng.uniform(2.0, 4.0, n))
        major = np.maximum(np.minimum(minor * elong, 0.45 * sp), minor)
        depth = np.where(along_z, rng.uniform(30.0, _Z_BLOCK, n), minor * rng.uniform(0.8, 1.2, n))
        return {
            "m_parent": par,
            "m_off": rng.uniform(-1, 1, (n, 2)) * 0.15 * sp[:, None],
            "m_zc": z0 + rng.uniform(0, _Z_BLOCK, n),
            "m_axes": np.stack([major, minor, depth], axis=1),
            "m_angle": rng.uniform(0.0, 180.0, n),
            "m_tilt": rng.uniform(-0.3, 0.3, (n, 2)),  # px per slice: not all run straight in z
            "m_cristae": rng.uniform(7.0, 11.0, n),  # px between cristae
        }

    def _vesicles(self, rng: np.random.Generator, z0: int) -> dict[str, np.ndarray]:
        """Spheres: packed clusters in boutons plus scattered ones, each inside a cell."""
        mpx = self.w * self.h / 1e6
        cpar = self._parents(rng, rng.poisson(10 * mpx), 40.0)
        rho = self.spacing[cpar] * rng.uniform(0.3, 0.45, cpar.size)  # cluster radius, px
        zext = rng.uniform(8.0, 20.0, cpar.size)  # cluster half-depth, slices
        cz = z0 + rng.uniform(0, _Z_BLOCK, cpar.size)
        # Half of each cluster's ellipsoid is vesicles of radius ~4 px (volume ~268 px^3);
        # they may overlap, which reads as dense packing.
        counts = np.minimum((0.5 * (4 / 3) * math.pi * rho**2 * zext / 268).astype(int), 600)
        k = np.repeat(np.arange(cpar.size), counts)
        direction = rng.normal(size=(k.size, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-12
        reach = rng.random(k.size) ** (1 / 3)  # uniform in the ellipsoid's volume
        lpar = rng.integers(0, len(self.spacing), rng.poisson(1500 * mpx))
        return {
            "v_parent": np.concatenate([cpar[k], lpar]),
            "v_off": np.concatenate(
                [
                    direction[:, :2] * (reach * rho[k])[:, None],
                    rng.uniform(-1, 1, (lpar.size, 2)) * 0.4 * self.spacing[lpar, None],
                ]
            ),
            "v_zc": np.concatenate(
                [
                    cz[k] + direction[:, 2] * reach * zext[k],
                    z0 + rng.uniform(0, _Z_BLOCK, lpar.size),
                ]
            ),
            "v_radius": np.concatenate(
                [rng.uniform(3.0, 5.0, k.size), 3.0 + 5.0 * rng.random(lpar.size) ** 2]
            ),
        }

    def _grain_field(self, k: int) -> np.ndarray:
        """Fine tissue texture of keyframe k (every 6 slices), (h, w) float32 grey levels."""
        if k not in self._grain:
            rng = _rng(self.seed, _STREAM_FIELDS, k)
            raw = rng.integers(0, 256, (self.h, self.w), dtype=np.uint8).astype(np.float32)
            g = cv2.GaussianBlur(raw, (0, 0), _GRAIN_PX)
            # Uniform bytes have std 73.9; a Gaussian blur keeps 1 / (2 sqrt(pi) sigma) of it.
            g = (g - 127.5) * (2.0 * math.sqrt(math.pi) * _GRAIN_PX / 73.9)
            # Unit-std texture plus dark specks where it peaks, like stained ribosomes.
            self._grain[k] = _GRAIN_STD * (g - 2.5 * np.maximum(g - 1.0, 0.0))
            for old in [key for key in self._grain if key < k - 1]:
                del self._grain[old]
        return self._grain[k]

    def _shading(self, z: int) -> np.ndarray:
        """Slow intensity variation at half resolution, (h/2, w/2) float32 grey levels.

        Blended between independent keyframes every 48 slices.
        """
        k, frac = divmod(z / _SHADING_EVERY, 1.0)
        grids = []
        for key in (int(k), int(k) + 1):
            rng = _rng(self.seed, _STREAM_FIELDS, -1 - key)
            grids.append(rng.standard_normal((6, 6)).astype(np.float32))
        grid = (1 - frac) * grids[0] + frac * grids[1]
        size_wh = (self.half_hw[1], self.half_hw[0])
        return cv2.resize(grid, size_wh, interpolation=cv2.INTER_CUBIC) * 9.0

    def render(self, z: int) -> np.ndarray:
        """World section z as (h, w) float32 grey levels, noise-free."""
        coded, tone = self._cell_fields(z)
        k, rem = divmod(z, _GRAIN_EVERY)
        frac = rem / _GRAIN_EVERY
        img: np.ndarray = cv2.addWeighted(
            self._grain_field(k), 1 - frac, self._grain_field(k + 1), frac, 0.0
        )
        img += cv2.LUT(coded, _INSIDE_LUT) * tone
        img += cv2.LUT(coded, _EDGE_LUT)
        self._draw_organelles(img, z)
        return cv2.GaussianBlur(img, (0, 0), 0.7)

    def _draw_organelles(self, img: np.ndarray, z: int) -> None:
        b = z // _Z_BLOCK
        blocks = [self._block(i) for i in (b - 1, b, b + 1)]
        pos = self.seed_xy(z)
        q = 16.0  # cv2 drawing with shift=4 takes coordinates in 1/16 px
        for blk in blocks:
            dz = z - blk["m_zc"]
            axes = blk["m_axes"]
            frac = 1.0 - (dz / axes[:, 2]) ** 2
            for i in np.flatnonzero(frac > 0):
                s = math.sqrt(frac[i])
                a, bb = axes[i, 0] * s, axes[i, 1] * s
                if bb < 3.0:
                    continue
                cx, cy = pos[blk["m_parent"][i]] + blk["m_off"][i] + blk["m_tilt"][i] * dz[i]
                ang = float(blk["m_angle"][i])
                centre = (int(cx * q), int(cy * q))
                cv2.ellipse(
                    img,
                    centre,
                    (int(a * q), int(bb * q)),
                    ang,
                    0,
                    360,
                    _BASE - 100.0,
                    -1,
                    cv2.LINE_8,
                    4,
                )
                cv2.ellipse(
                    img,
                    centre,
                    (int(a * q), int(bb * q)),
                    ang,
                    0,
                    360,
                    _BASE - 118.0,
                    2,
                    cv2.LINE_8,
                    4,
                )
                # Cristae: chords across the minor axis at fixed spacing along the major
                # axis; fixed in the mitochondrion, so they persist from slice to slice.
                cos, sin = math.cos(math.radians(ang)), math.sin(math.radians(ang))
                pitch = float(blk["m_cristae"][i])
                for u in np.arange(-math.floor(a / pitch), math.floor(a / pitch) + 1) * pitch:
                    if abs(u) > 0.85 * a:
                        continue
                    v = 0.7 * bb * math.sqrt(1 - (u / a) ** 2)
                    p1 = (cx + u * cos + v * sin, cy + u * sin - v * cos)
                    p2 = (cx + u * cos - v * sin, cy + u * sin + v * cos)
                    cv2.line(
                        img,
                        (int(p1[0] * q), int(p1[1] * q)),
                        (int(p2[0] * q), int(p2[1] * q)),
                        _BASE - 85.0,
                        1,
                        cv2.LINE_8,
                        4,
                    )
            dz = z - blk["v_zc"]
            r2 = blk["v_radius"] ** 2 - dz**2
            vis = np.flatnonzero(r2 >= 4.0)
            xy = (pos[blk["v_parent"][vis]] + blk["v_off"][vis]) * q
            rr = np.sqrt(r2[vis]) * q
            for (x, y), r in zip(xy.astype(int).tolist(), rr.astype(int).tolist(), strict=True):
                cv2.circle(img, (x, y), r, _BASE + 8.0, -1, cv2.LINE_8, 4)
                cv2.circle(img, (x, y), r, _BASE - 100.0, 1 if r < 48 else 2, cv2.LINE_8, 4)


# --- slices ---------------------------------------------------------------------------------


def _sample_slice(
    world: _World, world_from_slice: np.ndarray, index: int, width: int, height: int
) -> np.ndarray:
    """Sample one slice from world section ``index`` and add detector noise; (h, w) uint8."""
    section = world.render(index)
    img: np.ndarray = cv2.warpAffine(
        section,
        world_from_slice[:2],
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    # Sum of two uniform bytes: near-Gaussian and ~8x cheaper than standard_normal.
    rng = _rng(world.seed, _STREAM_NOISE, index)
    u = rng.integers(0, 256, (2, height, width), dtype=np.uint8)
    noise = u[0].astype(np.float32)
    noise += u[1]
    # The sum has std sqrt(2) * 73.9 = 104.5; + 0.5 because the cast below truncates.
    img += (noise - 255.0) * (_NOISE_SIGMA / 104.5) + 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8)


def iter_slices(
    n_slices: int,
    width: int,
    height: int,
    seed: int = 0,
    *,
    first_z: int = 0,
    drift: Drift | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(z, image)`` for z = first_z .. first_z + n_slices - 1, one at a time.

    Args:
        n_slices: number of slices, >= 1.
        width: slice width in pixels, 64 .. 8192.
        height: slice height in pixels, 64 .. 8192.
        seed: any non-negative integer; the same arguments give the same bytes.
        first_z: number of the first slice (only renames; content depends on z - first_z).
        drift: limits of the slice-to-slice drift; ``Drift()`` when None.

    Yields:
        The slice number and its (height, width) uint8 image.

    Raises:
        InvalidInput: an argument is out of range (at the call, not at the first slice).
    """
    drift = drift or Drift()
    _validate(n_slices, width, height, seed, first_z, DEFAULT_TEMPLATE)

    def slices() -> Iterator[tuple[int, np.ndarray]]:
        world = _World(width, height, seed, drift)
        transforms = iter_world_transforms(n_slices, width, height, seed, drift)
        for index, world_from_slice in enumerate(transforms):
            yield first_z + index, _sample_slice(world, world_from_slice, index, width, height)

    return slices()


def generate_slice(
    z: int,
    width: int,
    height: int,
    seed: int = 0,
    *,
    first_z: int = 0,
    drift: Drift | None = None,
) -> np.ndarray:
    """Slice ``z`` of the stack that :func:`iter_slices` would give, rendered on its own.

    Costs one slice plus the set-up of the world (~0.1 s at 1024 x 1024); the drift
    up to ``z`` is replayed, which takes ~0.2 ms per slice.

    Args:
        z: the slice number, >= first_z.
        width, height, seed, first_z, drift: as for :func:`iter_slices`.

    Returns:
        (height, width) uint8 image, identical to the one in the full stack.
    """
    drift = drift or Drift()
    _validate(1, width, height, seed, first_z, DEFAULT_TEMPLATE)
    index = _check_int("z - first_z", z - first_z, 0, MAX_SLICES - 1)
    *_, world_from_slice = iter_world_transforms(index + 1, width, height, seed, drift)
    return _sample_slice(_World(width, height, seed, drift), world_from_slice, index, width, height)


def ground_truth(
    n_slices: int,
    width: int,
    height: int,
    seed: int = 0,
    *,
    first_z: int = 0,
    template: str = DEFAULT_TEMPLATE,
    drift: Drift | None = None,
) -> dict:
    """The known transforms of a stack, cheap to compute without rendering it.

    Returns:
        ``{"image", "minz", "maxz", "width", "height", "seed", "convention",
        "drift", "world_size", "pairs", "world"}``: ``pairs[str(z)]`` (z = minz ..
        maxz - 1) is ``D_z``, 6 numbers mapping pixels of slice z+1 onto slice z;
        ``world[str(z)]`` is ``A_z``, mapping pixels of slice z to world pixels;
        ``world_size`` is [width, height] of the world in pixels.
    """
    drift = drift or Drift()
    _validate(n_slices, width, height, seed, first_z, template)
    world_a = list(iter_world_transforms(n_slices, width, height, seed, drift))
    margin = _world_margin_px(width, height, drift)
    pairs = {
        str(first_z + i): affine.from_matrix(np.linalg.solve(world_a[i], world_a[i + 1]))
        for i in range(n_slices - 1)
    }
    return {
        "image": template,
        "minz": first_z,
        "maxz": first_z + n_slices - 1,
        "width": width,
        "height": height,
        "seed": seed,
        "convention": CONVENTION,
        "drift": asdict(drift),
        "world_size": [width + 2 * margin, height + 2 * margin],
        "pairs": pairs,
        "world": {str(first_z + i): affine.from_matrix(a) for i, a in enumerate(world_a)},
    }


def generate_stack(
    n_slices: int,
    width: int,
    height: int,
    seed: int = 0,
    *,
    first_z: int = 0,
    template: str = DEFAULT_TEMPLATE,
    drift: Drift | None = None,
) -> tuple[list[np.ndarray], dict]:
    """A whole stack in memory (for small stacks) and its ground truth.

    Returns:
        The (height, width) uint8 slices in z order, and :func:`ground_truth`.
    """
    truth = ground_truth(
        n_slices, width, height, seed, first_z=first_z, template=template, drift=drift
    )
    slices = [
        img for _, img in iter_slices(n_slices, width, height, seed, first_z=first_z, drift=drift)
    ]
    return slices, truth


def write_sample(
    dest: str,
    n_slices: int,
    width: int,
    height: int,
    seed: int = 0,
    first_z: int = 0,
    template: str = DEFAULT_TEMPLATE,
    *,
    drift: Drift | None = None,
) -> dict:
    """Write a stack as PNG slices plus ``truth.json`` to ``dest`` through emprocess.storage.

    Args:
        dest: "gs://bucket/prefix", "file:///abs/dir" or a local directory.
        n_slices, width, height, seed, first_z, drift: as for :func:`iter_slices`.
        template: printf pattern of the slice names.

    A ``gs://`` bucket under a local storage root (``EMPROCESS_STORAGE_ROOT``) is created
    when missing, as the local stand-in of a bucket a user would make; on GCS the
    bucket must exist.

    Returns:
        The ground truth that was written as ``truth.json``.
    """
    from emprocess import storage  # the storage layer pulls in cloud clients: import late

    where = storage.parse_url(dest, allow_empty_key=True)
    if where.scheme == "gs" and storage.local_root() is not None:
        storage.create_bucket(where.bucket)

    truth = ground_truth(
        n_slices, width, height, seed, first_z=first_z, template=template, drift=drift
    )
    logger.info(
        "writing %d synthetic %dx%d slices (seed %d) to %s", n_slices, width, height, seed, dest
    )
    log_every = max(1, n_slices // 10)
    for z, img in iter_slices(n_slices, width, height, seed, first_z=first_z, drift=drift):
        ok, png = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError(f"PNG encoding of slice {z} failed")
        storage.write_bytes(storage.join(dest, template % z), png.tobytes(), "image/png")
        if (z - first_z + 1) % log_every == 0 or z == truth["maxz"]:
            done = z - first_z + 1
            if done == n_slices or done % max(1, n_slices // 10) == 0:
                logger.info("wrote slice %d (%d of %d)", z, done, n_slices)
    data = json.dumps(truth, indent=1).encode()
    storage.write_bytes(storage.join(dest, TRUTH_NAME), data, "application/json")
    return truth
