"""OME-Zarr 0.5 output of the lossless volume (conf ``raw_format``).

Known answer: the OME-Zarr volume equals the precomputed lossless volume of the same
requests voxel for voxel at every scale. The OME-Zarr side is read with zarr-python 3 (an
independent reader: not tensorstore, which wrote it) from a copy of the group's objects,
the precomputed side with tensorstore; the metadata is validated by ``ome-zarr-models``.
Real FIB-SEM slices (../shared/data/fibsem) through the real emwrite service under
gunicorn, on the local root and on the GCS emulator; 16-bit, anisotropic and 3-channel
volumes on the local root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
import tensorstore as ts
from conftest import SHARED_DATA, ServicePool, point_storage, unique_bucket
from test_view_browser import chromium  # noqa: F401  (the fixture)

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.kernels import omezarr
from emprocess.kernels.ngmeta import plan_cubes, scale_layouts
from emprocess.layout import RAW_OME_ZARR_PATH, RunLayout
from emprocess.models import NgMetaRequest, parse
from emprocess.workflow.conf import RunConf, parse_conf
from emprocess.workflow.payloads import ngmeta_task, plan_aligned_slices, plan_ng_shards

NUM_SCALES = 6
CUBE = 1024


def _docs(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "bbox_xy": (3000, 2100),
        "minz": 0,
        "maxz": 99,
        "resolution_nm": 8,
        "num_scales": NUM_SCALES,
        "data_type": "uint8",
        "num_channels": 1,
        "name": "vol",
        "cube": CUBE,
    }
    args.update(kw)
    return {k: json.loads(v) for k, v in omezarr.volume_documents(**args).items()}


def write_docs(folder: Path, docs: dict[str, bytes]) -> None:
    for key, data in docs.items():
        (folder / key).parent.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(data)


def validate(folder: Path) -> Any:
    """The group opened with zarr-python and validated as an OME-Zarr 0.5 image."""
    import zarr
    from ome_zarr_models.v05.image import Image

    return Image.from_zarr(zarr.open_group(str(folder), mode="r"))


# -- the metadata (kernel) ----------------------------------------------------------------


def test_group_metadata_is_ome_zarr_05() -> None:
    docs = _docs(minz=10, maxz=409, resolution_nm=[4, 4, 40])
    group = docs["zarr.json"]
    assert (group["zarr_format"], group["node_type"]) == (3, "group")
    ms = group["attributes"]["ome"]["multiscales"]
    assert group["attributes"]["ome"]["version"] == "0.5" and len(ms) == 1
    assert ms[0]["axes"] == [
        {"name": a, "type": "space", "unit": "nanometer"} for a in ("z", "y", "x")
    ]
    # x/y-first as the precomputed pyramid of 4 x 4 x 40 nm (test_anisotropic's factors).
    scales = [d["coordinateTransformations"][0] for d in ms[0]["datasets"]]
    assert [s["scale"] for s in scales] == [
        [40, 4, 4], [40, 8, 8], [40, 16, 16], [40, 32, 32], [80, 64, 64], [160, 128, 128]
    ]  # fmt: skip
    assert [d["path"] for d in ms[0]["datasets"]] == ["0", "1", "2", "3", "4", "5"]
    # Index 0 is slice minz: put back by one translation, the same at every scale.
    assert all(
        d["coordinateTransformations"][1] == {"type": "translation", "translation": [400, 0, 0]}
        for d in ms[0]["datasets"]
    )
    arrays = [docs[f"{s}/zarr.json"] for s in range(NUM_SCALES)]
    assert [a["shape"] for a in arrays] == [
        [400, 2100, 3000], [400, 1050, 1500], [400, 525, 750], [400, 263, 375],
        [200, 132, 188], [100, 66, 94]
    ]  # fmt: skip
    assert all(a["dimension_names"] == ["z", "y", "x"] for a in arrays)
    assert all(a["data_type"] == "uint8" and a["fill_value"] == 0 for a in arrays)
    sharding = [a["codecs"][0] for a in arrays]
    assert all(c["name"] == "sharding_indexed" for c in sharding)
    assert [c["configuration"]["chunk_shape"] for c in sharding] == [[64, 64, 64]] * 5 + [
        [64, 32, 32]
    ]
    # minz 0: no translation.
    plain = _docs()["zarr.json"]["attributes"]["ome"]["multiscales"][0]["datasets"]
    assert all(len(d["coordinateTransformations"]) == 1 for d in plain)


def test_channels_are_a_c_axis_first_and_whole_in_every_chunk() -> None:
    docs = _docs(num_channels=3)
    axes = docs["zarr.json"]["attributes"]["ome"]["multiscales"][0]["axes"]
    assert axes[0] == {"name": "c", "type": "channel"} and [a["name"] for a in axes[1:]] == [
        "z",
        "y",
        "x",
    ]
    a0 = docs["0/zarr.json"]
    assert a0["shape"] == [3, 100, 2100, 3000] and a0["dimension_names"] == ["c", "z", "y", "x"]
    assert a0["chunk_grid"]["configuration"]["chunk_shape"] == [3, 512, 512, 512]
    assert a0["codecs"][0]["configuration"]["chunk_shape"] == [3, 64, 64, 64]
    scale = docs["zarr.json"]["attributes"]["ome"]["multiscales"][0]["datasets"][1]
    assert scale["coordinateTransformations"][0]["scale"] == [1, 16, 16, 16]


@pytest.mark.parametrize("res", [8, [4, 4, 40], [16, 16, 4]])
@pytest.mark.parametrize("minz", [0, 7, 1500])
def test_every_shard_lies_in_one_cube(res: Any, minz: int) -> None:
    """Cubes start at minz = array index 0, so a shard grid dividing the cube at every
    scale gives each shard to exactly one /ngshard request."""
    docs = _docs(minz=minz, maxz=minz + 2500, resolution_nm=res)
    for s, layout in enumerate(scale_layouts(res, NUM_SCALES, cube=CUBE)):
        shard = docs[f"{s}/zarr.json"]["chunk_grid"]["configuration"]["chunk_shape"]
        cube_zyx = list(reversed(layout.cube))
        assert all(c % sh == 0 for c, sh in zip(cube_zyx, shard, strict=True)), (s, shard)
        assert omezarr.z_offset(minz, layout) == minz // layout.factor[2]


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_channels": 3, "minz": 5}, {"data_type": "uint16", "resolution_nm": [4, 4, 40]}],
)
def test_metadata_validates_with_ome_zarr_models(kw: dict[str, Any], tmp_path: Path) -> None:
    args: dict[str, Any] = {
        "bbox_xy": (700, 500),
        "minz": 0,
        "maxz": 40,
        "resolution_nm": 8,
        "num_scales": NUM_SCALES,
        "data_type": "uint8",
        "num_channels": 1,
        "name": "vol",
        "cube": CUBE,
        **kw,
    }
    write_docs(tmp_path, omezarr.volume_documents(**args))
    image = validate(tmp_path)
    assert len(image.attributes.ome.multiscales[0].datasets) == NUM_SCALES
    with pytest.raises(InvalidInput, match="channels"):
        omezarr.volume_documents(**{**args, "num_channels": 5})


# -- conf, requests, payloads -------------------------------------------------------------

CONF = {"id": "r1", "image": "img.%05d.png", "minz": 0, "maxz": 3, "source": "src"}


def test_payloads_carry_raw_format_only_when_not_precomputed() -> None:
    default = parse_conf(CONF)
    assert default.raw_format == "precomputed"
    assert "raw_format" not in ngmeta_task(default, [600, 500]).payload
    slices = plan_aligned_slices(default, {z: [1, 0, 0, 1, 0, 0] for z in range(4)}, [600, 500])
    assert all("raw_format" not in t.payload for t in plan_ng_shards(default, [600, 500], slices))
    for fmt in ("ome-zarr", "both"):
        conf = parse_conf({**CONF, "raw_format": fmt})
        assert ngmeta_task(conf, [600, 500]).payload["raw_format"] == fmt
        shards = plan_ng_shards(conf, [600, 500], slices)
        assert all(t.payload["raw_format"] == fmt for t in shards)
        assert (
            ngmeta_task(conf, [600, 500]).cache_key()
            != ngmeta_task(default, [600, 500]).cache_key()
        )
    assert default.layout.raw_sources(default.raw_format) == [
        "precomputed://gs://src_chunk_r1/neuroglancer/raw"
    ]
    assert default.layout.raw_sources("ome-zarr") == ["zarr3://gs://src_chunk_r1/raw.ome.zarr/"]


def test_bad_raw_format_confs_and_requests_are_refused() -> None:
    from emprocess.workflow.conf import InvalidRunConf

    with pytest.raises(InvalidRunConf, match="raw_format 'ome-zarr' asks for a raw volume"):
        parse_conf({**CONF, "raw_format": "ome-zarr", "createRawPyramid": False})
    with pytest.raises(InvalidRunConf, match="raw_format"):
        parse_conf({**CONF, "raw_format": "zarr"})
    volume = {"dest": "a_ng_r", "minz": 0, "maxz": 3, "bbox": [10, 10]}
    with pytest.raises(InvalidInput, match="raw_format 'both' needs writeRaw true"):
        parse(NgMetaRequest, {**volume, "writeRaw": False, "raw_format": "both"})
    with pytest.raises(InvalidInput, match="raw_format"):
        parse(NgMetaRequest, {**volume, "dest_raw": "a_chunk_r", "raw_format": "precomputed"})


def test_cli_has_a_raw_format_option() -> None:
    from typer.testing import CliRunner

    from emprocess.cli import app

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--raw-format" in result.output
    assert RunConf.model_fields["raw_format"].default == "precomputed"


# -- through the service ------------------------------------------------------------------


def read_zarr(url: str, dest: Path) -> Any:
    """Copy every object of the group at ``url`` (local root or GCS) to ``dest`` and open
    it with zarr-python."""
    import zarr

    loc = storage.parse_url(url.rstrip("/") + "/")
    for key in storage.list_keys(url.rstrip("/") + "/"):
        path = dest / key.removeprefix(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(f"gs://{loc.bucket}/{key}"))
    return zarr.open_group(str(dest), mode="r")


def read_precomputed(url: str, scale: int) -> np.ndarray:
    """One scale of a precomputed volume as (c, z, y, x), through tensorstore."""
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": storage.kvstore_spec(url),
            "scale_index": scale,
        },
        open=True,
    ).result()
    return np.asarray(store.read().result()).transpose(3, 2, 1, 0)


def assert_zarr_equals_precomputed(layout: RunLayout, tmp: Path, channels: int = 1) -> Any:
    """Every scale of raw.ome.zarr (zarr-python) == neuroglancer/raw (tensorstore)."""
    group = read_zarr(layout.raw_ome_zarr_url, tmp)
    validate(tmp)
    for s in range(NUM_SCALES):
        want = read_precomputed(layout.raw_url, s)
        got = np.asarray(group[str(s)][...])
        if channels == 1:
            want = want[0]
        assert got.dtype == want.dtype and got.shape == want.shape, s
        assert np.array_equal(got, want), f"scale {s}"
    assert np.asarray(group["0"][...]).any()
    return group


def _post(url: str, body: dict[str, Any], status: int = 200) -> str:
    r = requests.post(url, json=body, timeout=300)
    assert r.status_code == status, r.text
    return r.text


def write_stack(
    service: str,
    layout: RunLayout,
    slices: dict[int, np.ndarray],
    bbox: tuple[int, int],
    shift_xy: tuple[int, int] = (0, 0),
    **volume_fields: Any,
) -> dict[str, Any]:
    """Slices -> /alignedslice (translated by ``shift_xy``) -> /ngmeta -> every /ngshard.

    Returns:
        The /ngmeta body (the volume fields).
    """
    for b in (layout.source, layout.tmp, layout.process, layout.ng, layout.chunk):
        storage.create_bucket(b)
    extra = {k: v for k, v in volume_fields.items() if k in ("channels", "raw_dtype")}
    for z, image in slices.items():
        storage.write_bytes(
            f"gs://{layout.source}/s{z}.png", cv2.imencode(".png", image)[1].tobytes()
        )
        _post(
            service + "/alignedslice",
            {
                "img": f"s{z}.png", "transform": [1, 0, 0, 1, *shift_xy], "bbox": list(bbox),
                "dest": layout.source, "dest-tmp": layout.tmp, "slice": z,
                "run_id": layout.run_id, **extra,
            },
        )  # fmt: skip
    zs = sorted(slices)
    volume = {
        "dest": layout.ng, "dest_raw": layout.chunk, "minz": zs[0], "maxz": zs[-1],
        "bbox": list(bbox), "writeRaw": True, **volume_fields,
    }  # fmt: skip
    _post(service + "/ngmeta", volume)
    for start in plan_cubes(bbox, zs[0], zs[-1]):
        _post(service + "/ngshard", {**volume, "source": layout.tmp, "start": list(start)})
    return volume


def fibsem(z: int) -> np.ndarray:
    path = SHARED_DATA / "fibsem" / f"img.{z:05d}.png"
    if not path.is_file():
        pytest.fail(
            f"real FIB-SEM stack not found in {path.parent}: ../shared/data must sit beside the checkout"
        )
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8
    return image


def snapshot(url: str) -> dict[str, bytes]:
    return {k: storage.read_bytes(f"gs://{k}") for k in _keys(url)}


def _keys(url: str) -> list[str]:
    bucket = storage.parse_url(url + "/").bucket
    return [f"{bucket}/{k}" for k in storage.list_keys(url.rstrip("/") + "/")]


def test_real_stack_ome_zarr_equals_precomputed_and_repeats_give_the_same_bytes(
    emwrite_service: str, backend: str, tmp_path: Path
) -> None:
    """Six real slices on a two-cube canvas (x 1100 > 1024), minz 3, 10 nm."""
    layout = RunLayout(unique_bucket("oz"), "r")
    slices = {z: fibsem(z) for z in range(3, 9)}
    volume = write_stack(
        emwrite_service, layout, slices, (1100, 600), (560, 40), resolution=10, raw_format="both"
    )
    group = assert_zarr_equals_precomputed(layout, tmp_path / "copy")
    assert group.attrs["ome"]["multiscales"][0]["name"] == layout.chunk
    assert np.array_equal(np.asarray(group["0"][:, 40:560, 560:1080]), np.stack(
        [np.asarray(read_precomputed(layout.raw_url, 0))[0, i, 40:560, 560:1080] for i in range(6)]
    ))  # fmt: skip
    # Both cubes wrote shards of their own at scale 0 (x shards 0, 1 and 2).
    keys = _keys(layout.raw_ome_zarr_url)
    assert any(k.endswith(f"{RAW_OME_ZARR_PATH}/0/c/0/0/2") for k in keys), keys
    before = snapshot(layout.raw_ome_zarr_url)
    _post(emwrite_service + "/ngmeta", volume)
    for start in plan_cubes((1100, 600), 3, 8):
        _post(emwrite_service + "/ngshard", {**volume, "source": layout.tmp, "start": list(start)})
    assert snapshot(layout.raw_ome_zarr_url) == before
    # A shard cut short by a failed request (this one reaches past the 6 slices, so
    # tensorstore would read it to keep its unwritten chunks) is replaced by the retry.
    for key in (k for k in before if "/c/" in k):
        storage.write_bytes(f"gs://{key}", before[key][:1000])
    for start in plan_cubes((1100, 600), 3, 8):
        _post(emwrite_service + "/ngshard", {**volume, "source": layout.tmp, "start": list(start)})
    assert snapshot(layout.raw_ome_zarr_url) == before
    # Another geometry over a volume with data is refused, naming the document.
    # The run's JPEG volume removed: only the OME-Zarr one is left to refuse (a request's
    # buckets must be one run's, so the JPEG volume cannot be elsewhere).
    jpeg = snapshot(f"gs://{layout.ng}")
    for key in jpeg:
        storage.delete(f"gs://{key}")
    other = {**volume, "maxz": 7, "raw_format": "ome-zarr"}
    text = _post(emwrite_service + "/ngmeta", other, 400)
    assert "raw.ome.zarr" in text and "another volume" in text
    assert snapshot(layout.raw_ome_zarr_url) == before
    # /ngshard of another geometry: refused before any write.
    text = _post(
        emwrite_service + "/ngshard",
        {**volume, "resolution": 8, "source": layout.tmp, "start": [0, 0, 0]},
        400,
    )
    assert "zarr.json" in text or "info" in text


def test_ome_zarr_alone_writes_no_precomputed_raw(
    service_pool: ServicePool, local_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    point_storage(monkeypatch, str(local_root))
    service = service_pool.url("emwrite", "local")
    slices = {z: fibsem(z) for z in range(0, 5)}
    both, alone = RunLayout(unique_bucket("ozb"), "r"), RunLayout(unique_bucket("oza"), "r")
    write_stack(service, both, slices, (520, 520), raw_format="both")
    volume = write_stack(service, alone, slices, (520, 520), raw_format="ome-zarr")
    assert not storage.list_keys(alone.raw_url + "/")
    # The same shards, byte for byte (the group's name is the bucket's, so it differs).
    a, b = snapshot(both.raw_ome_zarr_url), snapshot(alone.raw_ome_zarr_url)
    shards = [k.split(RAW_OME_ZARR_PATH, 1)[1] for k in a if "/c/" in k]
    assert shards and sorted(shards) == sorted(
        k.split(RAW_OME_ZARR_PATH, 1)[1] for k in b if "/c/" in k
    )
    for tail in shards:
        assert (
            a[f"{both.chunk}/{RAW_OME_ZARR_PATH}{tail}"]
            == b[f"{alone.chunk}/{RAW_OME_ZARR_PATH}{tail}"]
        )
    # /ngshard without the group's metadata: 400, naming it.
    storage.delete(storage.join(alone.raw_ome_zarr_url, "zarr.json"))
    text = _post(service + "/ngshard", {**volume, "source": alone.tmp, "start": [0, 0, 0]}, 400)
    assert "zarr.json does not exist" in text and "/ngmeta" in text
    # /ngmeta puts the missing document back; one that is not JSON over shards is refused.
    _post(service + "/ngmeta", volume)
    _post(service + "/ngshard", {**volume, "source": alone.tmp, "start": [0, 0, 0]})
    storage.write_bytes(storage.join(alone.raw_ome_zarr_url, "zarr.json"), b"not json")
    text = _post(service + "/ngmeta", volume, 400)
    assert "zarr.json describes another volume that already has data" in text
    # A chunk bucket that is not this run's (here: does not exist): 400 before any write.
    missing = unique_bucket("ozm")
    text = _post(service + "/ngmeta", {**volume, "dest_raw": missing}, 400)
    assert f"dest_raw {missing!r}" in text


def _smooth(shape: tuple[int, ...], seed: int, dtype: Any, high: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random(shape).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 3)
    lo, hi = blurred.min(), blurred.max()
    return ((blurred - lo) / (hi - lo) * high).astype(dtype)


@pytest.mark.parametrize("kind", ["uint16", "anisotropic", "rgb"])
def test_16bit_anisotropic_and_colour_volumes(
    kind: str,
    service_pool: ServicePool,
    local_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    point_storage(monkeypatch, str(local_root))
    service = service_pool.url("emwrite", "local")
    layout = RunLayout(unique_bucket("ozk"), "r")
    width, height, minz = 300, 260, 2
    fields: dict[str, Any] = {"raw_format": "both"}
    channels = 1
    if kind == "uint16":
        slices = {z: _smooth((height, width), z, np.uint16, 60000) for z in range(minz, minz + 5)}
        fields.update(raw_dtype="uint16")
    elif kind == "anisotropic":
        slices = {z: _smooth((height, width), z, np.uint8, 255) for z in range(minz, minz + 9)}
        fields.update(resolution=[4, 4, 40])
    else:
        slices = {z: _smooth((height, width, 3), z, np.uint8, 255) for z in range(minz, minz + 4)}
        fields.update(channels=3)
        channels = 3
    write_stack(service, layout, slices, (width, height), **fields)
    group = assert_zarr_equals_precomputed(layout, tmp_path / "copy", channels)
    a0 = group["0"]
    if kind == "uint16":
        assert a0.dtype == np.uint16 and int(np.asarray(a0[...]).max()) > 255
        # The lossless volume kept the 16-bit values themselves (identity transform).
        assert np.array_equal(np.asarray(a0[0]), slices[minz])
    elif kind == "anisotropic":
        scales = [
            d["coordinateTransformations"][0]["scale"]
            for d in group.attrs["ome"]["multiscales"][0]["datasets"]
        ]
        assert scales[:2] == [[40, 4, 4], [40, 8, 8]]
        assert [group[str(s)].shape[0] for s in range(NUM_SCALES)] == [9, 9, 9, 9, 5, 3]
    else:
        assert a0.shape == (3, 4, height, width)
        assert tuple(group["0"].metadata.dimension_names) == ("c", "z", "y", "x")


# -- a real run of the DAG ----------------------------------------------------------------

E2E_SLICES = 5


@pytest.fixture(scope="module")
def zarr_run(airflow_db: Path, dag_bag: Any, service_pool: ServicePool, local_root: Path) -> Any:
    """Five real FIB-SEM slices through the width-1 DAG with ``raw_format: both``."""
    from dags_conftest_helpers import run_on_local

    from emprocess.workflow import dag_id

    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        source = unique_bucket("ozrun")
        storage.create_bucket(source)
        for z in range(E2E_SLICES):
            storage.write_bytes(
                f"gs://{source}/img.{z:05d}.png", cv2.imencode(".png", fibsem(z))[1].tobytes()
            )
        conf = {
            "id": "run",
            "image": "img.%05d.png",
            "minz": 0,
            "maxz": E2E_SLICES - 1,
            "source": source,
            "resolution": 10,
            "neighbors": 1,
            "raw_format": "both",
        }
        return run_on_local(mp, dag_bag.dags[dag_id(1)], conf, service_pool, local_root)


@pytest.mark.slow
def test_dag_run_writes_an_ome_zarr_equal_to_the_precomputed_volume(
    zarr_run: Any, local_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from emprocess.report import load_run

    point_storage(monkeypatch, str(local_root))
    assert zarr_run.state == "success", zarr_run.task_states
    for path in ("/ngmeta", "/ngshard"):
        assert all(b["raw_format"] == "both" for b in zarr_run.bodies(path)), path
    assert all("raw_format" not in b for b in zarr_run.bodies("/alignedslice"))
    group = assert_zarr_equals_precomputed(zarr_run.layout, tmp_path / "copy")
    assert group["0"].shape[0] == E2E_SLICES
    report = load_run(zarr_run.source, zarr_run.run_id)
    assert report.raw_volumes() == [
        f"precomputed://{zarr_run.layout.raw_url}",
        f"zarr3://{zarr_run.layout.raw_ome_zarr_url}/",
    ]
    assert f"zarr3://{zarr_run.layout.raw_ome_zarr_url}/" in report.summary_text()


# -- viewing ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A 256 x 256 x 64 run at 8 nm whose lossless volume is OME-Zarr only."""
    from volumes import build_test_volume

    root = tmp_path_factory.mktemp("view-zarr")
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(root))
        volume = build_test_volume(
            "viewzarr", "run1", 64, 256, 256, minz=5, write_raw=True, raw_format="ome-zarr"
        )
    return root, volume


def test_view_and_link_show_the_ome_zarr_layer(
    zarr_volume: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.parse

    from emprocess.view import DataServer, gcs_view, serve_run

    root, volume = zarr_volume
    point_storage(monkeypatch, str(root))
    with serve_run(volume.source, volume.run_id, raw=True) as session:
        names = [layer.name for layer in session.viewer.state.layers]
        assert names == ["run1", "run1-ome-zarr"]
        source = session.viewer.state.layers[1].source[0].url
        assert source == f"zarr3://{session.data_server.url}/{RAW_OME_ZARR_PATH}/"
        r = requests.get(f"{session.data_server.url}/{RAW_OME_ZARR_PATH}/zarr.json", timeout=10)
        assert r.status_code == 200 and r.json()["attributes"]["ome"]["version"] == "0.5"
    # A public bucket (a DataServer playing GCS): the link has the zarr3:// layer.
    point_storage(monkeypatch, None)
    layout = RunLayout(volume.source, volume.run_id)
    mounts = {
        f"{layout.ng}/neuroglancer/jpeg": root / layout.ng / "neuroglancer" / "jpeg",
        f"{layout.chunk}/{RAW_OME_ZARR_PATH}": root / layout.chunk / RAW_OME_ZARR_PATH,
    }
    with DataServer(mounts) as fake_gcs:
        result = gcs_view(volume.source, volume.run_id, raw=True, gcs_url=fake_gcs.url)
    assert not result.warnings(), result.warnings()
    state = json.loads(urllib.parse.unquote(result.link.split("#!", 1)[1]))
    assert [layer["source"] for layer in state["layers"]] == [
        layout.neuroglancer_source(),
        f"zarr3://{layout.raw_ome_zarr_url}/",
    ]


@pytest.mark.parametrize(
    ("found", "shown"),
    [
        (set(), (True, False)),  # neither: the precomputed one, so its absence is reported
        ({"neuroglancer/raw"}, (True, False)),
        ({RAW_OME_ZARR_PATH}, (False, True)),
        ({"neuroglancer/raw", RAW_OME_ZARR_PATH}, (True, True)),
    ],
)
def test_raw_layers_are_the_volumes_found(found: set[str], shown: tuple[bool, bool]) -> None:
    from emprocess.view import layer_source, metadata_key, raw_formats

    assert raw_formats(lambda prefix: prefix in found) == shown
    assert metadata_key(RAW_OME_ZARR_PATH) == f"{RAW_OME_ZARR_PATH}/zarr.json"
    assert metadata_key("neuroglancer/raw") == "neuroglancer/raw/info"
    assert layer_source("gs://b", RAW_OME_ZARR_PATH) == f"zarr3://gs://b/{RAW_OME_ZARR_PATH}/"
    assert layer_source("gs://b", "neuroglancer/raw") == "precomputed://gs://b/neuroglancer/raw"


def test_a_colour_ome_zarr_layer_makes_c_a_channel_dimension() -> None:
    from emprocess.view import RGB_SHADER, ome_zarr_layer

    docs = {
        k: v
        for k, v in omezarr.volume_documents((64, 64), 0, 3, 8, 2, "uint8", 3, "v", CUBE).items()
    }
    options = ome_zarr_layer("r", "zarr3://gs://b/raw.ome.zarr/", docs["0/zarr.json"], (4, 4, 40))
    layer = options["r-ome-zarr"]
    assert layer["shader"] == RGB_SHADER
    assert layer["source"]["transform"]["outputDimensions"] == {
        "c^": [1, ""], "z": [4e-08, "m"], "y": [4e-09, "m"], "x": [4e-09, "m"]
    }  # fmt: skip
    grey = omezarr.volume_documents((64, 64), 0, 3, 8, 2, "uint8", 1, "v", CUBE)["0/zarr.json"]
    assert ome_zarr_layer("r", "zarr3://x/", grey, (8, 8, 8)) == {}
    assert ome_zarr_layer("r", "zarr3://x/", None, (8, 8, 8)) == {}
    assert ome_zarr_layer("r", "zarr3://x/", b"not json", (8, 8, 8)) == {}


@pytest.mark.slow
def test_browser_shows_the_ome_zarr_volume(
    zarr_volume: tuple[Path, Any],
    monkeypatch: pytest.MonkeyPatch,
    chromium: Any,  # noqa: F811  (test_view_browser's fixture)
    tmp_path: Path,
) -> None:
    """Headless Chromium, the JPEG layer hidden: what is drawn comes from raw.ome.zarr."""
    import time

    from test_view_browser import LOAD_TIMEOUT_S, MIN_XY_CORRELATION, measure_screenshot

    from emprocess.view import serve_run

    root, volume = zarr_volume
    point_storage(monkeypatch, str(root))
    group = read_zarr(RunLayout(volume.source, volume.run_id).raw_ome_zarr_url, tmp_path / "z")
    with serve_run(volume.source, volume.run_id, raw=True) as session:
        with session.viewer.txn() as s:
            s.layers["run1"].visible = False
        z = int(session.viewer.state.position[2])  # a slice number: index z - minz
        truth = np.asarray(group["0"][z - volume.minz])
        t0 = time.monotonic()
        chromium.get(session.url)
        while True:
            png = chromium.get_screenshot_as_png()
            metrics = measure_screenshot(png, truth)
            if metrics.ok() or time.monotonic() - t0 > LOAD_TIMEOUT_S:
                break
            time.sleep(1.0)
        (tmp_path / "viewer.png").write_bytes(png)
        records = session.data_server.records
    # Neuroglancer asks a shard's size (HEAD), then its index and chunks by byte range.
    shards = [r for r in records if f"/{RAW_OME_ZARR_PATH}/0/c/" in r.path and r.method == "GET"]
    context = (
        f"{metrics}; screenshot {tmp_path / 'viewer.png'}; requests "
        f"{[(r.path, r.range, r.status) for r in records[:30]]}; browser log "
        f"{[e.get('message') for e in chromium.get_log('browser')][-10:]}"
    )
    assert shards and all(r.range and r.status == 206 for r in shards), context
    assert not any("/neuroglancer/jpeg/" in r.path and r.path.endswith(".shard") for r in records)
    assert metrics.ok() and metrics.xy_correlation >= MIN_XY_CORRELATION, context


@pytest.mark.slow
def test_browser_shows_a_colour_ome_zarr_volume_in_colour(
    chromium: Any,  # noqa: F811  (test_view_browser's fixture)
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Three bands (red, green, blue) kept as a ``c`` axis: with the JPEG layers hidden, the
    OME-Zarr layer's RGB shader draws them left to right (neuroglancer reads ``c`` as the
    channel dimension)."""
    import time

    from test_view_browser import (
        LOAD_TIMEOUT_S,
        MIN_BAND,
        TOP_BARS_PX,
        colour_fractions,
    )
    from volumes import build_test_volume

    from emprocess.view import serve_run

    root = tmp_path_factory.mktemp("view-zarr-rgb")
    point_storage(monkeypatch, str(root))
    volume = build_test_volume(
        "viewzrgb", "rgb", 8, 192, 128, colour_bands=True, write_raw=True, raw_format="ome-zarr"
    )
    with serve_run(volume.source, volume.run_id, raw=True, layout="xy") as session:
        names = [layer.name for layer in session.viewer.state.layers]
        assert names == ["rgb-c0", "rgb-c1", "rgb-c2", "rgb-ome-zarr"]
        zarr_layer = session.viewer.state.layers["rgb-ome-zarr"].to_json()
        assert "c^" in zarr_layer["source"][0]["transform"]["outputDimensions"]
        assert "getDataValue(2)" in zarr_layer["shader"]
        with session.viewer.txn() as s:
            for name in names[:3]:
                s.layers[name].visible = False
        t0 = time.monotonic()
        chromium.get(session.url)
        while True:
            png = chromium.get_screenshot_as_png()
            bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            found = colour_fractions(bgr[TOP_BARS_PX:])
            if (
                min(f for f, _ in found.values()) >= MIN_BAND
                or time.monotonic() - t0 > LOAD_TIMEOUT_S
            ):
                break
            time.sleep(1.0)
        records = session.data_server.records
    (tmp_path / "colour.png").write_bytes(png)
    context = (
        f"{found}; screenshot {tmp_path / 'colour.png'}; browser log "
        f"{[e.get('message') for e in chromium.get_log('browser')][-10:]}"
    )
    assert not any("/neuroglancer/jpeg" in r.path and "/c" in r.path for r in records)
    assert all(fraction >= MIN_BAND for fraction, _ in found.values()), context
    assert found["red"][1] < found["green"][1] < found["blue"][1], context
