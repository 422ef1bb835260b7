"""The emwrite service under real gunicorn: known answers, every scale, repeats, bad requests.

Every check runs on both storage backends. The references are written here,
independently of the service's kernels: ``cv2.warpAffine`` of the whole canvas,
OpenCV CLAHE of the whole canvas as ``emprocess.kernels.clahe`` defines it, and a
plain numpy 2x2x2 mean per scale. The JPEG pyramid is read back with tensorstore
and with cloud-volume, an independent reader, on both backends.

JPEG tolerance, per scale: the mean and the 99th percentile of |JPEG - reference|
(grey levels) may exceed those of OpenCV's own JPEG of the reference (quality 75,
tensorstore's default, chunk by chunk as neuroglancer lays chunks out) by at most
10% + 0.3 and 10% + 2 levels, and stay below 10 and 32 where a slice has at least
64 x 64 px (a 5 x 4 px coarse scale is JPEG's worst case). On the CLAHE'd
synthetic slices (contrast std ~65 levels) quality 75 itself costs 3.9-7.3 mean
and 15-25 p99 per scale, and the service's error equals OpenCV's within 0.01; a
shifted or wrongly downsampled scale fails by far. The lossless pyramid must
match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pytest
import requests
import tensorstore as ts
from conftest import unique_bucket

from emprocess import affine, storage
from emprocess.kernels import ngmeta, tiles
from emprocess.layout import RunLayout
from emprocess.models import AlignedSliceRequest
from emprocess.sample import generate_stack
from emprocess.services import emwrite
from emprocess.settings import ServiceEnv, load

RUN_ID = "run1"
CLIP = 0.02
SCALES = 6
JPEG_QUALITY = 75
JPEG_MEAN_MAX, JPEG_P99_MAX = 10.0, 32.0
TEMPLATE = "img.%05d.png"


# -- independent references ------------------------------------------------------


def reference_slice(image: np.ndarray, transform: list[float], bbox: tuple[int, int]) -> np.ndarray:
    """warpAffine (bicubic, fill 0) of the whole canvas, then CLAHE of the whole canvas.

    CLAHE as clahe.py's module doc defines it: reflect-pad (BORDER_REFLECT_101) the
    canvas to whole 1024 px tiles, OpenCV CLAHE with clipLimit = clip * 256, crop.
    Pixels outside the warped slice (0) stay 0.
    """
    width, height = bbox
    warped = cv2.warpAffine(
        image,
        affine.to_matrix(transform),
        (width, height),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    padded = cv2.copyMakeBorder(warped, 0, -height % 1024, 0, -width % 1024, cv2.BORDER_REFLECT_101)
    grid = (padded.shape[1] // 1024, padded.shape[0] // 1024)
    out = cv2.createCLAHE(clipLimit=CLIP * 256, tileGridSize=grid).apply(padded)[:height, :width]
    out[warped == 0] = 0
    return out


def mean_2x(volume: np.ndarray) -> np.ndarray:
    """Mean of each 2x2x2 block of a (z, y, x) volume (of the voxels that exist), half up."""
    pad = [(0, n % 2) for n in volume.shape]
    v = np.pad(volume.astype(np.float64), pad, constant_values=np.nan)
    z, y, x = v.shape
    blocks = v.reshape(z // 2, 2, y // 2, 2, x // 2, 2)
    return np.floor(np.nanmean(blocks, axis=(1, 3, 5)) + 0.5).astype(np.uint8)


def pyramid(volume: np.ndarray, scales: int = SCALES) -> list[np.ndarray]:
    levels = [volume]
    for _ in range(1, scales):
        levels.append(mean_2x(levels[-1]))
    return levels


def jpeg_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """Mean and 99th percentile of |got - want| in grey levels."""
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return float(diff.mean()), float(np.percentile(diff, 99))


def opencv_jpeg_chunks(volume: np.ndarray, chunk: int) -> np.ndarray:
    """Round trip of a (z, y, x) volume through OpenCV JPEG, chunk by chunk.

    Each chunk is one image of width x and height y * z (neuroglancer's precomputed
    "jpeg" encoding), so 8 x 8 JPEG blocks straddle z like they do in the volume.
    """
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    out = np.empty_like(volume)
    nz, ny, nx = volume.shape
    for z in range(0, nz, chunk):
        for y in range(0, ny, chunk):
            for x in range(0, nx, chunk):
                block = volume[z : z + chunk, y : y + chunk, x : x + chunk]
                image = np.ascontiguousarray(block).reshape(-1, block.shape[2])
                decoded = cv2.imdecode(cv2.imencode(".jpg", image, params)[1], 0)
                assert decoded is not None
                out[z : z + chunk, y : y + chunk, x : x + chunk] = decoded.reshape(block.shape)
    return out


def assert_jpeg_close(got: np.ndarray, want: np.ndarray, scale: int, what: str) -> None:
    """JPEG tolerance (module doc): no worse than OpenCV's JPEG of the reference."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    own = opencv_jpeg_chunks(want, ngmeta.scale_chunk_px(scale))
    mean, p99 = jpeg_error(got, want)
    own_mean, own_p99 = jpeg_error(own, want)
    assert mean <= 1.1 * own_mean + 0.3 and p99 <= 1.1 * own_p99 + 2, (
        f"{what}: mean {mean:.2f} p99 {p99} vs OpenCV JPEG {own_mean:.2f} {own_p99}"
    )
    if min(want.shape[1:]) >= 64:  # a few pixels of a coarse scale are JPEG's worst case
        assert mean < JPEG_MEAN_MAX and p99 < JPEG_P99_MAX, f"{what}: mean {mean:.2f} p99 {p99}"


# -- readers -------------------------------------------------------------------------


def read_tensorstore(url: str, scale: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """One scale as (z, y, x) and its voxel offset (x, y, z), through tensorstore."""
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": storage.kvstore_spec(url),
            "scale_index": scale,
        },
        open=True,
    ).result()
    data = store.read().result()[..., 0].transpose(2, 1, 0)
    return np.ascontiguousarray(data), tuple(int(v) for v in store.domain.inclusive_min[:3])


def read_cloudvolume(url: str, scale: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """One scale as (z, y, x) and its voxel offset, through cloud-volume.

    tensorstore does not store chunks that are entirely 0 (the canvas margin), and
    neuroglancer shows an absent chunk as 0; cloud-volume does so with fill_missing.
    On GCS cloud-volume finds the emulator through STORAGE_EMULATOR_HOST.
    """
    from cloudvolume import CloudVolume

    loc = storage.parse_url(url)
    root = storage.local_root()
    path = f"file://{root / loc.bucket / loc.key}" if root else f"gs://{loc.bucket}/{loc.key}"
    vol = CloudVolume(
        f"precomputed://{path}", mip=scale, progress=False, cache=False, fill_missing=True
    )
    data = np.asarray(vol[vol.bounds])[..., 0].transpose(2, 1, 0)
    return np.ascontiguousarray(data), tuple(int(v) for v in vol.voxel_offset)


def snapshot(buckets: list[str]) -> dict[tuple[str, str], bytes]:
    """Every object of the buckets, by (bucket, key)."""
    return {
        (b, key): storage.read_bytes(f"gs://{b}/{key}")
        for b in buckets
        for key in storage.list_keys(f"gs://{b}/")
    }


def post(base: str, path: str, body: Any) -> requests.Response:
    return requests.post(base + path, json=body, timeout=300)


def post_ok(base: str, path: str, body: Any) -> None:
    r = post(base, path, body)
    assert r.status_code == 200 and r.text == "success", r.text


# -- one run of the pipeline -----------------------------------------------------------


@dataclass
class StackRun:
    """A synthetic stack, its buckets and its reference canvas, as one run sees them."""

    source: str
    minz: int
    bbox: tuple[int, int]
    transforms: dict[int, list[float]]
    reference: np.ndarray  # (z, y, x) uint8: the CLAHE'd canvas of every slice
    cubes: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def maxz(self) -> int:
        return self.minz + len(self.transforms) - 1

    def bucket(self, role: str) -> str:
        return RunLayout(self.source, RUN_ID).bucket_names()[role]

    def slice_body(self, z: int, legacy: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "img": TEMPLATE % z,
            "transform": self.transforms[z],
            "bbox": list(self.bbox),
            "dest": self.source,
            "dest-tmp": self.bucket("tmp"),
            "slice": z,
            "shard-size": 1024,
            "run_id": RUN_ID,
            "clip-limit": CLIP,
        }
        if legacy:  # the original DAG sent JSON strings
            body.update(transform=str(body["transform"]), bbox=str(body["bbox"]), slice=str(z))
        return body

    def volume_body(self, **extra: Any) -> dict[str, Any]:
        return {
            "dest": self.bucket("ng"),
            "dest_raw": self.bucket("chunk"),
            "minz": self.minz,
            "maxz": self.maxz,
            "bbox": list(self.bbox),
            "shard-size": 1024,
            "writeRaw": True,
            "resolution": 8,
            **extra,
        }

    def run(self, service: str) -> None:
        """Every request of a run: /alignedslice per slice, /ngmeta, /ngshard per cube."""
        for i, z in enumerate(sorted(self.transforms)):
            post_ok(service, "/alignedslice", self.slice_body(z, legacy=i % 2 == 1))
        post_ok(service, "/ngmeta", self.volume_body())
        for start in self.cubes:
            post_ok(
                service,
                "/ngshard",
                {**self.volume_body(), "source": self.bucket("tmp"), "start": list(start)},
            )


def make_stack_run(slices: int = 4, width: int = 1100, height: int = 900) -> StackRun:
    """A stack with drift plus a 2.5 degree turn and a shift: canvas ~1190 x 1000 px."""
    minz = 7
    images, truth = generate_stack(slices, width, height, seed=3, first_z=minz)
    turn = affine.from_matrix(cv2.getRotationMatrix2D((width / 2, height / 2), 2.5, 1.0))
    world = {int(z): affine.compose(turn, t) for z, t in truth["world"].items()}
    corners = np.concatenate(
        [affine.apply(t, affine.corners_xy(width, height)) for t in world.values()]
    )
    lo, hi = np.floor(corners.min(0)), np.ceil(corners.max(0))
    shift = affine.translation(-lo[0], -lo[1])
    transforms = {z: affine.compose(shift, t) for z, t in world.items()}
    bbox = (int(hi[0] - lo[0]), int(hi[1] - lo[1]))
    assert bbox[0] % 64 and bbox[1] % 64 and bbox[0] > 1024  # two cubes in x, ragged edges
    source = unique_bucket("stack")
    run = StackRun(source, minz, bbox, transforms, np.empty(0, np.uint8))
    for b in [source, *(run.bucket(r) for r in ("tmp", "process", "ng", "chunk"))]:
        storage.create_bucket(b)
    for z, image in zip(sorted(transforms), images, strict=True):
        ok, png = cv2.imencode(".png", image)
        assert ok
        storage.write_bytes(f"gs://{source}/{TEMPLATE % z}", png.tobytes())
    run.reference = np.stack(
        [
            reference_slice(im, transforms[z], bbox)
            for z, im in zip(sorted(transforms), images, strict=True)
        ]
    )
    run.cubes = ngmeta.plan_cubes(bbox, minz, run.maxz)
    return run


_RUNS: dict[str, StackRun] = {}


@pytest.fixture
def stack_run(backend: str, emwrite_service: str) -> StackRun:
    """The stack pushed through the service once per backend (shared by the tests below)."""
    if backend not in _RUNS:
        run = make_stack_run()
        run.run(emwrite_service)
        _RUNS[backend] = run
    return _RUNS[backend]


# -- 1. known answers ------------------------------------------------------------


def test_every_scale_matches_the_numpy_reference(stack_run: StackRun, backend: str) -> None:
    run = stack_run
    assert len(run.cubes) == 2
    want = pyramid(run.reference)
    jpeg_url, raw_url = (
        RunLayout(run.source, RUN_ID).jpeg_url,
        RunLayout(run.source, RUN_ID).raw_url,
    )
    raw = [read_tensorstore(raw_url, s) for s in range(SCALES)]
    for s in range(SCALES):
        offset = (0, 0, run.minz >> s)
        assert raw[s][1] == offset
        for read in (read_tensorstore, read_cloudvolume):
            got, got_offset = read(jpeg_url, s)
            assert got_offset == offset, read.__name__
            assert_jpeg_close(got, want[s], s, f"{read.__name__} jpeg scale {s}")
    # Lossless: scale 0 is exactly the tiles in the tmp bucket ...
    tiled = np.stack(
        [
            tiles.decode_tiled_slice(storage.read_bytes(emwrite.tiles_url(run.bucket("tmp"), z)))
            for z in sorted(run.transforms)
        ]
    )
    np.testing.assert_array_equal(raw[0][0], tiled)
    # ... which is the reference up to the warp's fixed-point rounding (1 px in 2000) ...
    diff = np.abs(tiled.astype(np.int16) - run.reference)
    assert (diff > 0).mean() < 0.005 and diff.mean() < 0.05
    # ... and every coarser scale is exactly the 2x2x2 mean of the one before.
    exact = pyramid(raw[0][0])
    for s in range(1, SCALES):
        np.testing.assert_array_equal(raw[s][0], exact[s], err_msg=f"raw scale {s}")
    np.testing.assert_array_equal(read_cloudvolume(raw_url, SCALES - 1)[0], exact[-1])


def test_thumbnails_are_the_downsized_canvas(stack_run: StackRun) -> None:
    run = stack_run
    width, height = run.bbox
    for i, z in enumerate(sorted(run.transforms)):
        thumb = read_thumbnail(run.bucket("process"), TEMPLATE % z)
        assert thumb.dtype == np.uint8 and max(thumb.shape) <= 4096
        f = round(width / thumb.shape[1])
        assert f >= 1 and f & (f - 1) == 0
        assert thumb.shape == (math.ceil(height / f), math.ceil(width / f))
        # The mean of each f x f block of the canvas (of the pixels that exist).
        ref = np.pad(
            run.reference[i].astype(np.float64),
            ((0, -height % f), (0, -width % f)),
            constant_values=np.nan,
        )
        small = np.nanmean(ref.reshape(thumb.shape[0], f, thumb.shape[1], f), axis=(1, 3))
        assert f == emwrite.THUMB_MIN_FACTOR
        diff = np.abs(thumb - np.floor(small + 0.5))  # ties and the warp's rare 1-level steps
        assert diff.mean() < 0.05 and diff.max() <= 1


def read_thumbnail(process_bucket: str, img: str) -> np.ndarray:
    data = storage.read_bytes(f"gs://{process_bucket}/{RUN_ID}/align/{img}")
    thumb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert thumb is not None
    return thumb


def test_large_slices_in_windows_give_the_same_tiles(backend: str) -> None:
    """In-process: 1024 px windows (3 x 2 here) stitch to exactly the one-window slice."""
    src = unique_bucket("win")
    run = RunLayout(src, RUN_ID)
    for b in (src, run.process, run.tmp):
        storage.create_bucket(b)
    (image,), _ = generate_stack(1, 2400, 1200, seed=5)
    _, png = cv2.imencode(".png", image)
    storage.write_bytes(f"gs://{src}/big.png", png.tobytes())
    turn = affine.from_matrix(cv2.getRotationMatrix2D((1200, 600), 1.5, 1.0))
    body: dict[str, Any] = {
        "img": "big.png",
        "transform": affine.compose(affine.translation(40, 45), turn),
        "bbox": [2500, 1300],
        "dest": src,
        "dest-tmp": run.tmp,
        "slice": 0,
        "run_id": RUN_ID,
    }
    emwrite.aligned_slice(AlignedSliceRequest.model_validate(body))
    whole = read_thumbnail(run.process, "big.png")
    small_windows = load(ServiceEnv).model_copy(update={"window_px": 1024})
    emwrite.aligned_slice(AlignedSliceRequest.model_validate({**body, "slice": 1}), small_windows)
    tiles_of = [storage.read_bytes(emwrite.tiles_url(run.tmp, z)) for z in (0, 1)]
    assert tiles_of[0] == tiles_of[1]
    windowed = read_thumbnail(run.process, "big.png")
    assert windowed.shape == whole.shape == (325, 625)
    np.testing.assert_array_equal(windowed, whole)
    reference = reference_slice(image, body["transform"], (2500, 1300))
    diff = np.abs(tiles.decode_tiled_slice(tiles_of[1]).astype(np.int16) - reference)
    assert (diff > 0).mean() < 0.005


# -- 2. z ranges and small volumes -------------------------------------------------


def smooth_volume(shape_zyx: tuple[int, int, int], seed: int) -> np.ndarray:
    """EM-free test data that JPEG handles well: smooth waves plus mild noise."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij", sparse=True)
    rng = np.random.default_rng(seed)
    v = 128 + 70 * np.sin(x / 9.0 + z / 40.0) * np.cos(y / 7.0 - z / 90.0)
    return np.clip(v + rng.normal(0, 3, shape_zyx), 1, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("minz", "maxz", "bbox"),
    [(1000, 2029, (70, 50)), (5, 5, (70, 50)), (3, 40, (300, 130))],
    ids=["two-z-cubes-from-1000", "single-slice", "smaller-than-a-cube"],
)
def test_z_ranges_and_small_volumes(
    emwrite_service: str, backend: str, minz: int, maxz: int, bbox: tuple[int, int]
) -> None:
    src = unique_bucket("vol")
    run = RunLayout(src, RUN_ID)
    tmp, ng, chunk = run.tmp, run.ng, run.chunk
    for b in (tmp, ng, chunk):
        storage.create_bucket(b)
    volume = smooth_volume((maxz - minz + 1, bbox[1], bbox[0]), seed=minz)

    def put(i: int) -> None:  # both tile codecs: readers follow the header
        codec: tiles.Codec = "png" if i % 2 else "raw"
        blob = tiles.encode_tiled_slice(volume[i], codec=codec)
        storage.write_bytes(emwrite.tiles_url(tmp, minz + i), blob)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(len(volume))))
    body = {"dest": ng, "dest_raw": chunk, "minz": minz, "maxz": maxz, "bbox": list(bbox)}
    post_ok(emwrite_service, "/ngmeta", body)
    cubes = ngmeta.plan_cubes(bbox, minz, maxz)
    assert len(cubes) == (2 if maxz - minz >= 1024 else 1)
    for start in cubes:
        post_ok(emwrite_service, "/ngshard", {**body, "source": tmp, "start": list(start)})
    want = pyramid(volume)
    for s in range(SCALES):
        offset = (0, 0, minz >> s)
        raw, raw_offset = read_tensorstore(run.raw_url, s)
        assert raw_offset == offset
        np.testing.assert_array_equal(raw, want[s], err_msg=f"raw scale {s}")
        jpeg, jpeg_offset = read_tensorstore(run.jpeg_url, s)
        assert jpeg_offset == offset
        assert_jpeg_close(jpeg, want[s], s, f"jpeg scale {s}")
    # The coarsest scale again, through the other reader, at its own offsets.
    last = SCALES - 1
    assert want[last].shape[0] == math.ceil((maxz - minz + 1) / 2**last)
    cv_data, cv_offset = read_cloudvolume(run.jpeg_url, last)
    assert cv_offset == (0, 0, minz >> last)
    assert_jpeg_close(cv_data, want[last], last, "cloud-volume coarsest scale")


# -- 3. repeats give the same bytes, also after a request failed half way ------------------


def test_repeats_and_repairs_give_identical_bytes(
    stack_run: StackRun, emwrite_service: str
) -> None:
    run = stack_run
    outputs = [run.bucket(r) for r in ("tmp", "process", "ng", "chunk")]
    before = snapshot(outputs)
    assert sum(k[1].endswith(".shard") for k in before) >= 2 * SCALES
    run.run(emwrite_service)
    assert snapshot(outputs) == before

    # A /ngshard that died half way: one shard missing, another cut short, in both volumes.
    shards = sorted(k for k in before if k[1].endswith(".shard") and k[1].split("/")[2] == "8_8_8")
    assert len(shards) >= 4
    for i, (bucket, key) in enumerate(shards):
        if i % 2:
            storage.delete(f"gs://{bucket}/{key}")
        else:
            storage.write_bytes(
                f"gs://{bucket}/{key}", before[(bucket, key)][: len(before[(bucket, key)]) // 2]
            )
    # An /alignedslice that died half way: a cut tiles object and no thumbnail.
    z = run.minz
    tiles_url = emwrite.tiles_url(run.bucket("tmp"), z)
    storage.write_bytes(tiles_url, storage.read_bytes(tiles_url)[:1000])
    storage.delete(f"gs://{run.bucket('process')}/{RUN_ID}/align/{TEMPLATE % z}")
    assert snapshot(outputs) != before
    post_ok(emwrite_service, "/alignedslice", run.slice_body(z))
    for start in run.cubes:
        body = {**run.volume_body(), "source": run.bucket("tmp"), "start": list(start)}
        post_ok(emwrite_service, "/ngshard", body)
    assert snapshot(outputs) == before


# -- 4. bad requests: 400 with a message, never a traceback -----------------------------


@pytest.fixture
def bad_env(backend: str, emwrite_service: str) -> dict[str, Any]:
    """Buckets for one small run: a 100 x 80 slice, a file that is not an image, ngmeta done."""
    src = unique_bucket("bad")
    run = RunLayout(src, RUN_ID)
    env: dict[str, Any] = {
        "src": src,
        "tmp": run.tmp,
        "ng": run.ng,
        "chunk": run.chunk,
        "missing": unique_bucket("missing"),
    }
    for b in (src, run.process, env["tmp"], env["ng"], env["chunk"]):
        storage.create_bucket(b)
    _, png = cv2.imencode(".png", np.full((80, 100), 120, np.uint8))
    storage.write_bytes(f"gs://{src}/img.00000.png", png.tobytes())
    storage.write_bytes(f"gs://{src}/notes.png", b"these are not pixels")
    env["slice"] = {
        "img": "img.00000.png",
        "transform": [1, 0, 0, 1, 0, 0],
        "bbox": [100, 80],
        "dest": src,
        "dest-tmp": env["tmp"],
        "slice": 0,
        "run_id": RUN_ID,
    }
    env["volume"] = {
        "dest": env["ng"],
        "dest_raw": env["chunk"],
        "minz": 0,
        "maxz": 3,
        "bbox": [100, 80],
    }
    post_ok(emwrite_service, "/ngmeta", env["volume"])
    env["shard"] = {**env["volume"], "source": env["tmp"], "start": [0, 0, 0]}
    return env


def _other_run(env: dict[str, Any], roles: tuple[str, ...]) -> dict[str, Any]:
    """The /ngshard body of a new run of the same source whose ``roles`` buckets exist."""
    run = RunLayout(env["src"], unique_bucket("r"))
    for role in roles:
        storage.create_bucket(run.bucket_names()[role])
    return {**env["shard"], "dest": run.ng, "dest_raw": run.chunk, "source": run.tmp}


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


BAD_REQUESTS: list[tuple[str, str, Callable[[dict], Any], str]] = [
    (
        "missing key",
        "/alignedslice",
        lambda e: _without(e["slice"], "transform"),
        "missing key 'transform'",
    ),
    ("unknown key", "/alignedslice", lambda e: {**e["slice"], "colour": 1}, "unknown key 'colour'"),
    ("slice not a number", "/alignedslice", lambda e: {**e["slice"], "slice": "twelve"}, "slice"),
    (
        "transform of 5",
        "/alignedslice",
        lambda e: {**e["slice"], "transform": [1, 0, 0, 1, 0]},
        "transform",
    ),
    (
        "transform not JSON",
        "/alignedslice",
        lambda e: {**e["slice"], "transform": "[1, 0"},
        "transform",
    ),
    ("bbox zero", "/alignedslice", lambda e: {**e["slice"], "bbox": [0, 80]}, "bbox"),
    ("bbox negative", "/alignedslice", lambda e: {**e["slice"], "bbox": [100, -80]}, "bbox"),
    ("clip-limit", "/alignedslice", lambda e: {**e["slice"], "clip-limit": 2}, "clip-limit"),
    ("shard-size", "/alignedslice", lambda e: {**e["slice"], "shard-size": 512}, "shard-size"),
    (
        "singular transform",
        "/alignedslice",
        lambda e: {**e["slice"], "transform": [0] * 6},
        "singular",
    ),
    (
        "not an image",
        "/alignedslice",
        lambda e: {**e["slice"], "img": "notes.png"},
        "not a PNG, TIFF or JPEG",
    ),
    (
        "no such image",
        "/alignedslice",
        lambda e: {**e["slice"], "img": "img.09999.png"},
        "img.09999.png",
    ),
    (
        "no tmp bucket",
        "/alignedslice",
        lambda e: {**e["slice"], "run_id": "gone", "dest-tmp": e["src"] + "_tmp_gone"},
        "does not exist",
    ),
    (
        "no source bucket",
        "/alignedslice",
        lambda e: {**e["slice"], "dest": e["missing"], "dest-tmp": f"{e['missing']}_tmp_{RUN_ID}"},
        "does not exist",
    ),
    ("body not JSON", "/alignedslice", lambda e: None, "must be JSON"),
    ("body a list", "/ngmeta", lambda e: [e["volume"]], "valid dictionary"),
    (
        "minz > maxz",
        "/ngmeta",
        lambda e: {**e["volume"], "minz": 9},
        "minz (9) must be <= maxz (3)",
    ),
    ("raw without bucket", "/ngmeta", lambda e: _without(e["volume"], "dest_raw"), "dest_raw"),
    ("writeRaw string", "/ngmeta", lambda e: {**e["volume"], "writeRaw": "maybe"}, "writeRaw"),
    (
        "no dest bucket",
        "/ngmeta",
        lambda e: {
            **e["volume"],
            "dest": e["src"] + "_ng_gone",
            "dest_raw": e["src"] + "_chunk_gone",
        },
        "does not exist",
    ),
    (
        "ngshard before ngmeta",
        "/ngshard",
        lambda e: _other_run(e, ("tmp", "ng", "chunk")),
        "run /ngmeta first",
    ),
    ("missing tile object", "/ngshard", lambda e: e["shard"], "aligned slice 0 is missing"),
    (
        "start outside",
        "/ngshard",
        lambda e: {**e["shard"], "start": [1, 0, 0]},
        "outside the volume",
    ),
    ("start negative", "/ngshard", lambda e: {**e["shard"], "start": [0, -1, 0]}, "start"),
    (
        "channels of a grey slice",
        "/alignedslice",
        lambda e: {**e["slice"], "channels": 3},
        "has 1 channel(s), expected 3",
    ),
    (
        "channels with 16 bits",
        "/alignedslice",
        lambda e: {**e["slice"], "channels": 3, "raw_dtype": "uint16"},
        "keeps one grey channel only",
    ),
    ("channels 5", "/ngmeta", lambda e: {**e["volume"], "channels": 5}, "channels"),
    ("channels as text", "/ngmeta", lambda e: {**e["volume"], "channels": "3"}, "channels"),
    (
        "channels, other volume",
        "/ngshard",
        lambda e: {**e["shard"], "channels": 3},
        "describes another volume",
    ),
    ("start of 2", "/ngshard", lambda e: {**e["shard"], "start": [0, 0]}, "start"),
    ("no source", "/ngshard", lambda e: _other_run(e, ("ng", "chunk")), "does not exist"),
    (
        "other volume",
        "/ngshard",
        lambda e: {**e["shard"], "bbox": [101, 80]},
        "describes another volume",
    ),
]


@pytest.mark.parametrize(
    ("path", "make", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_400_naming_the_problem(
    emwrite_service: str, bad_env: dict[str, Any], path: str, make: Callable, message: str
) -> None:
    body = make(bad_env)
    if body is None:
        json_type = {"Content-Type": "application/json"}
        r = requests.post(emwrite_service + path, data=b"{not json", headers=json_type, timeout=60)
    else:
        r = post(emwrite_service, path, body)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    assert message in r.json()["error"]
    assert "Traceback" not in r.text and 'File "' not in r.text


@pytest.mark.parametrize("keep", [20, -10], ids=["header-cut", "tile-cut"])
def test_a_tile_object_cut_short_is_named(
    emwrite_service: str, bad_env: dict[str, Any], keep: int
) -> None:
    for z in range(4):
        post_ok(emwrite_service, "/alignedslice", {**bad_env["slice"], "slice": z})
    url = emwrite.tiles_url(bad_env["tmp"], 2)
    storage.write_bytes(url, storage.read_bytes(url)[:keep])
    r = post(emwrite_service, "/ngshard", bad_env["shard"])
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(f"aligned slice 2 ({url}) is unusable")
    assert "cut short" in r.json()["error"]


def test_our_own_failure_is_a_short_500(
    backend: str, bad_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret detail /srv/internal/path")

    monkeypatch.setattr(ngmeta, "build_info", broken)
    client = emwrite.create_app().test_client()
    r = client.post("/ngmeta", json=bad_env["volume"])
    assert r.status_code == 500
    error = r.get_json()["error"]
    assert error == "internal error in emwrite: RuntimeError"
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)
    assert client.get("/health").status_code == 200
