"""The run-conf schema: defaults, aliases, and every rule it refuses a conf by."""

from __future__ import annotations

from typing import Any

import pytest

from emprocess.workflow import DEFAULT_DYNAMIC_WIDTH
from emprocess.workflow.conf import InvalidRunConf, RunConf, conf_keys, parse_conf
from emprocess.workflow.params import param_specs
from emprocess.workflow.slicenames import check_template, template_prefix

GOOD: dict[str, Any] = {
    "id": "run1_0123456789ab",
    "image": "img.%05d.png",
    "minz": 10,
    "maxz": 20,
    "source": "my-slices",
}


def conf(**changes: Any) -> dict[str, Any]:
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(InvalidRunConf) as info:
        parse_conf(data)
    return str(info.value)


def test_defaults_and_contract_keys() -> None:
    c = parse_conf(GOOD)
    assert c.to_json() == {
        **GOOD,
        "project": None,
        "location": None,
        "email": None,
        "downsample_factor": 1,
        "skip_align": False,
        "clip-limit": 0.02,
        "createRawPyramid": True,
        "resolution": 8.0,
        "intensity": "auto",
        "raw_bits": 8,
        "raw_format": "precomputed",
        "public": False,
        "width": None,
        "neighbors": 3,
        "global_solve": True,
        "regularization": 10.0,
        "skip_slices": [],
        "bad_slice_fill": "own",
        "align_from": None,
        "destreak": False,
        "intensity_correction": "none",
        "channels": 1,
        "align_channel": "mean",
        "jpeg_channels": "rgb",
        "channel_templates": None,
    }
    assert c.layout.bucket_names() == {
        "source": "my-slices",
        "process": "my-slices_process",
        "tmp": "my-slices_tmp_run1_0123456789ab",
        "ng": "my-slices_ng_run1_0123456789ab",
        "chunk": "my-slices_chunk_run1_0123456789ab",
    }
    assert c.slice_names()[0] == "img.00010.png" and len(c.slice_names()) == 11
    assert c.layout.neuroglancer_source() == (
        "precomputed://gs://my-slices_ng_run1_0123456789ab/neuroglancer/jpeg"
    )
    assert (
        c.layout.process_url("align", "x.json")
        == "gs://my-slices_process/run1_0123456789ab/align/x.json"
    )


def test_legacy_aliases() -> None:
    c = parse_conf(conf(project_id="proj-1", rawPyramid=False, **{"clip-limit": 0}))
    assert (c.project, c.create_raw_pyramid, c.clip_limit) == ("proj-1", False, 0.0)
    assert "chunk" not in c.layout.bucket_names()
    # The trigger form sends project: null alongside a legacy key; the legacy value wins.
    assert parse_conf(conf(project=None, project_id="p2")).project == "p2"
    assert parse_conf(conf(project="p2", project_id="p2")).project == "p2"
    msg = problems(conf(createRawPyramid=True, rawPyramid=False))
    assert "'rawPyramid' is the legacy name of 'createRawPyramid'" in msg
    # The original DAG's conf spelled email "mail".
    assert parse_conf(conf(mail="lab@example.org")).email == "lab@example.org"
    assert parse_conf(conf(mail="a@b.org")).to_json()["email"] == "a@b.org"
    msg = problems(conf(mail="a@b.org", email="c@d.org"))
    assert "'mail' is the legacy name of 'email'" in msg
    # Legacy string forms of numbers and booleans are accepted at this edge.
    c = parse_conf(conf(minz="3", maxz="4", skip_align="true"))
    assert (c.minz, c.maxz, c.skip_align) == (3, 4, True)


def test_missing_required_keys_are_named() -> None:
    msg = problems(conf(image=...))
    assert msg == "invalid run conf: image: required key is missing"
    msg = problems({})
    for key in ("id", "image", "minz", "maxz", "source"):
        assert f"{key}: required key is missing" in msg


def test_minz_after_maxz() -> None:
    assert "minz 21 is greater than maxz 20; minz must be <= maxz" in problems(conf(minz=21))
    assert "minz: Input should be greater than or equal to 0 (got -1)" in problems(conf(minz=-1))


@pytest.mark.parametrize("factor", [0, -2, 1.5, 65])
def test_downsample_factor_range(factor: float) -> None:
    msg = problems(conf(downsample_factor=factor))
    assert "downsample_factor: " in msg and f"(got {factor})" in msg


def test_unknown_key_is_named_with_the_known_ones() -> None:
    msg = problems(conf(clip_limt=0.1))
    assert "clip_limt: unknown key (value 0.1)" in msg
    assert "'clip-limit'" in msg and "'rawPyramid'" in msg


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("img.png", "has 0 integer fields"),
        ("img.%05d.%03d.png", "has 2 integer fields ['%05d', '%03d']"),
        ("img.%s.png", "has field '%s'"),
        ("img.%(z)d.png", "has field '%('"),
        ("img.%05.2f.png", "has field '%05.2f'"),
        ("img.%", "has field '%'"),
        ("../img.%05d.png", "gives for z=10"),
    ],
)
def test_bad_templates(image: str, expected: str) -> None:
    msg = problems(conf(image=image))
    assert msg.startswith("invalid run conf: image") or "image template" in msg
    assert expected in msg


def test_good_templates_and_prefix() -> None:
    for t in ("img.%05d.png", "%d.tif", "a/b/s_%i.png", "100%%_%04u.png"):
        assert check_template(t) == t
    assert template_prefix("a/b/img.%05d.png") == "a/b/img."
    assert template_prefix("100%%_%04u.png") == "100%_"
    assert parse_conf(conf(image="100%%_%04u.png")).slice_name(7) == "100%_0007.png"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source": "My_Slices"}, "source: bucket name 'My_Slices' may only hold lowercase"),
        ({"source": "goog-data"}, "may not start with 'goog'"),
        (
            {"id": "x" * 50},
            "bucket name 'my-slices_tmp_" + "x" * 50 + "' has 64 characters; allowed 3 to 63",
        ),
        ({"id": "x" * 48}, "the chunk bucket name 'my-slices_chunk_" + "x" * 48),
    ],
)
def test_bad_bucket_names_name_source_and_id(changes: dict[str, Any], expected: str) -> None:
    msg = problems(conf(**changes))
    assert expected in msg
    if "id" in changes:
        assert "source 'my-slices' and id" in msg


def test_long_id_is_fine_without_the_raw_volume() -> None:
    assert parse_conf(conf(id="x" * 48, createRawPyramid=False)).id == "x" * 48


def test_other_ranges() -> None:
    assert "clip-limit: " in problems(conf(**{"clip-limit": 1.5}))
    assert "resolution: " in problems(conf(resolution=0))
    assert "resolution 0.0 nm is not in (0, 1e+06]" in problems(conf(resolution=[4, 4, 0]))
    assert "[x, y, z]" in problems(conf(resolution=[4, 4]))
    assert "low 9 must be < high 3" in problems(conf(intensity=[9, 3]))
    assert "within [0, 65535]" in problems(conf(intensity=[0, 70000]))
    assert 'intensity: intensity must be "auto", "full" or [low, high] (got \'bright\')' in (
        problems(conf(intensity="bright"))
    )
    assert "resolution must be one number or [x, y, z] in nm (got 'abc')" in problems(
        conf(resolution="abc")
    )
    assert parse_conf(conf(resolution="10")).resolution_xyz == (10.0, 10.0, 10.0)
    assert "width: " in problems(conf(width=0))
    assert "skip_align: " in problems(conf(skip_align="maybe"))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"id": "Run1"}, "id: run id 'Run1' must be 1 to 63 lowercase letters"),
        ({"id": "-rf"}, "id: run id '-rf' must be"),
        ({"id": "--help"}, "id: run id '--help' must be"),
        ({"id": "a.b"}, "id: run id 'a.b' must be"),
        ({"id": "run\n"}, "id: run id 'run\\n' must be"),
        ({"maxz": 10**18}, "maxz: Input should be less than or equal to 99999999"),
        ({"minz": 0, "maxz": 1_000_000}, "1000001 slices; at most 1000000 are allowed"),
        ({"image": "img.%0999999999d.png"}, "its width and precision may be at most 20"),
        ({"image": "img.%.999999999d.png"}, "its width and precision may be at most 20"),
        ({"email": "a@b.org\r\nBcc: x@y.z"}, "email: 'a@b.org\\r\\nBcc: x@y.z' is not an email"),
        ({"email": "a@b.org\n"}, "is not an email address"),
        ({"email": "nobody"}, "'nobody' is not an email address"),
        ({"minz": True}, "minz: Input should be a valid integer (got True)"),
        ({"minz": 1.0}, "minz: Input should be a valid integer (got 1.0)"),
        ({"downsample_factor": "1.5"}, "downsample_factor: Input should be a valid integer"),
        ({"skip_align": 1}, "skip_align: Input should be a valid boolean (got 1)"),
        ({"public": "yes"}, "public: Input should be a valid boolean (got 'yes')"),
        ({"resolution": float("inf")}, "resolution inf nm is not in (0, 1e+06]"),
        ({"resolution": True}, "resolution must be one number or [x, y, z] in nm (got True)"),
    ],
)
def test_strict_types_and_bounds(changes: dict[str, Any], expected: str) -> None:
    assert expected in problems(conf(**changes))


def test_legacy_strings_and_email_lists_are_accepted() -> None:
    c = parse_conf(conf(resolution="4.5", public="False", email="a@b.org, c.d+e@f-g.co.uk"))
    assert (c.resolution, c.public, c.email) == (4.5, False, "a@b.org, c.d+e@f-g.co.uk")


def test_param_specs_follow_the_schema() -> None:
    fixed = param_specs(dynamic=False, default_width=DEFAULT_DYNAMIC_WIDTH)
    dynamic = param_specs(dynamic=True, default_width=7)
    assert list(fixed) == [k for k in conf_keys() if k != "width"]
    assert list(dynamic) == conf_keys()
    assert dynamic["width"] == {
        "default": 7,
        "description": RunConf.model_fields["width"].description,
        "maximum": 1024,
        "minimum": 1,
        "title": "Width",
        "type": "integer",
    }
    for key, spec in fixed.items():
        assert spec["description"], key
        assert ("default" in spec) == (key not in {"id", "image", "minz", "maxz", "source"}), key
    assert fixed["minz"]["type"] == "integer" and fixed["minz"]["minimum"] == 0
    assert fixed["downsample_factor"]["minimum"] == 1 and fixed["downsample_factor"]["default"] == 1
    assert fixed["project"]["type"] == ["string", "null"]
    assert fixed["clip-limit"]["default"] == 0.02 and fixed["clip-limit"]["maximum"] == 1.0
    assert fixed["createRawPyramid"] == {
        "default": True,
        "description": RunConf.model_fields["create_raw_pyramid"].description,
        "title": "Write the raw volume",
        "type": "boolean",
    }
    # Mutating one spec does not leak into the next DAG's.
    fixed["minz"]["minimum"] = 99
    assert param_specs(dynamic=False, default_width=1)["minz"]["minimum"] == 0
