"""The features stage's plan: one request per slice, the very one each pair derives."""

from __future__ import annotations

from typing import Any

import pytest

from emprocess.layout import features_key
from emprocess.models import AlignRequest, FeaturesRequest, parse
from emprocess.workflow.conf import InvalidRunConf, parse_conf
from emprocess.workflow.payloads import plan_align_pairs, plan_features

BASE: dict[str, Any] = {
    "id": "run7",
    "image": "stack/img.%05d.png",
    "minz": 3,
    "maxz": 12,
    "source": "slices",
}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"downsample_factor": 4, "neighbors": 6},
        {
            "channel_templates": ["r/img.%05d.png", "g/img.%05d.png"],
            "image": "r/img.%05d.png",
            "align_channel": "mean",
        },
    ],
    ids=["plain", "ds4-k6", "channel-files"],
)
def test_every_pair_asks_for_the_features_the_stage_stored(extra: dict[str, Any]) -> None:
    conf = parse_conf({**BASE, **extra})
    window = (100.0, 4000.0)
    features = plan_features(conf, window)
    assert [t.index for t in features] == list(range(10))
    assert [t.name for t in features] == [f"z{z:06d}" for z in range(3, 13)]
    assert {t.path for t in features} == {"/features"}
    by_slice = {t.payload["img"]: t.payload for t in features}
    pairs = plan_align_pairs(conf, window)
    assert len(pairs) == sum(min(conf.neighbors, 12 - z) for z in range(3, 12))
    for task in pairs:
        req = AlignRequest.from_payload(dict(task.payload))
        assert req.run_id == "run7"
        for role in ("pre", "post"):
            derived = FeaturesRequest.of_pair(req, role)  # what the service looks up
            assert derived.payload() == by_slice[derived.img]
    # A worker's share is its slices, with the whole plan's indexes.
    share = plan_features(conf, window, (1, 4))
    assert [t.index for t in share] == [1, 5, 9]
    assert [t.payload for t in share] == [features[i].payload for i in (1, 5, 9)]


def test_features_requests_parse_and_refuse_like_pair_requests() -> None:
    req = parse(FeaturesRequest, {"img": "gs://bkt/x.png", "run_id": "r"})
    assert (req.downsample, req.params, req.channel_files) == (1, {}, None)
    with pytest.raises(Exception, match="channel_files needs channel"):
        parse(FeaturesRequest, {"img": "gs://bkt/x.png", "run_id": "r", "channel_files": ["gs://bkt/y.png"]})  # fmt: skip
    with pytest.raises(Exception, match="run_id"):
        parse(FeaturesRequest, {"img": "gs://bkt/x.png", "run_id": "a/b"})
    with pytest.raises(Exception, match="without run_id"):
        FeaturesRequest.of_pair(AlignRequest(pre="gs://bkt/x.png", post="gs://bkt/y.png"), "pre")


def test_neighbors_up_to_six() -> None:
    assert parse_conf({**BASE, "neighbors": 6}).neighbors == 6
    with pytest.raises(InvalidRunConf, match="neighbors"):
        parse_conf({**BASE, "neighbors": 7})


def test_features_key_is_the_layouts() -> None:
    assert features_key("run7", "stack/img.00003.png", "ab12") == (
        "run7/align/features/img.00003.ab12.feat"
    )
    assert features_key("r", "noext", "d") == "r/align/features/noext.d.feat"
