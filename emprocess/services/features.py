"""Features once per slice in the alignment service: POST /features, and pairs that match them.

With ``neighbors: k`` every slice is in 2k pairs; decoding it and extracting its SIFT
features in each of them was most of the alignment's cost (issue 19). So the DAG first
sends one POST /features per slice (:class:`~emprocess.models.FeaturesRequest`): the
service extracts the slice's first-attempt features exactly as a pair request would and
stores them in the run's process bucket under a name that
:func:`emprocess.layout.features_key` builds from a digest of everything that shapes
them: the slice's URL, its object's size and update time (a replaced slice gets new
features), the channel files, the downsample factor, the window, the channel and the
extraction fields of the recipe (:data:`~emprocess.kernels.align.EXTRACTION_FIELDS`).

A pair request with ``run_id`` (POST /) then reads the two stored objects instead of the
images and matches them (:func:`~emprocess.kernels.align.align_features`, the same
answer as the images give). A slice whose features are missing (never extracted, or
its object changed) is extracted by the pair and stored for the next pair; a pair
whose first attempt finds no model decodes the two slices only for the retries (more
scale steps, a smaller sigma need other features). The answer says which happened in
``features``: ``{"pre": "stored" | "computed", "post": ..., "retry_decoded": bool}``.

Trust: the features are written only to ``SOURCE_process`` of the slice's own bucket,
under the request's run id, never to a bucket the request names; a stored object is
read with a byte bound (:func:`~emprocess.kernels.features.max_encoded_bytes`) and
checked field by field before it is used, and one that is not ours is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from flask import Flask, jsonify

from emprocess import layout, storage
from emprocess.errors import BucketNotFound, InvalidInput, ObjectNotFound
from emprocess.kernels.align import (
    AlignParams,
    SliceFeatures,
    align_features,
    extract_features,
    extraction_recipe,
)
from emprocess.kernels.features import decode_features, encode_features, max_encoded_bytes
from emprocess.kernels.intensity import to_uint8
from emprocess.models import AlignRequest, FeaturesRequest
from emprocess.services.align import MAX_SIZE_RATIO, read_channel_files, read_image, source_size
from emprocess.services.common import json_body, parse

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped when the extraction changes in a way the recipe does not show."""


def _object_identity(url: str) -> list[Any]:
    """[size, update time] of the object at ``url``, from a one-object listing."""
    loc = storage.parse_url(url)
    found = storage.list_objects(url, limit=1)
    if not found or found[0].key != loc.key:
        raise ObjectNotFound(loc.bucket, loc.key)
    return [found[0].size, found[0].updated.isoformat()]


def features_url(req: FeaturesRequest, params: AlignParams) -> tuple[str, dict[str, Any]]:
    """Where the features of ``req`` live, and the description its digest is taken of."""
    files = [req.img, *(req.channel_files or [])]
    described: dict[str, Any] = {
        "format": FORMAT,
        "slice": req.img,
        "channel_files": req.channel_files,
        "objects": [_object_identity(url) for url in files],
        "downsample": req.downsample,
        "intensity_window": req.intensity_window,
        "channel": req.channel,
        "recipe": extraction_recipe(params),
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    described["digest"] = digest
    loc = storage.parse_url(req.img)
    return layout.features_url(loc.bucket, req.run_id, loc.key, digest), described


def load_slice(req: FeaturesRequest, *, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The slice as a pair request sees it (read within ``max_pixels``, downsampled,
    windowed) and its size (width, height) before the downsampling."""
    size = source_size(req.img)
    if min(size) // req.downsample < 16:
        raise InvalidInput(
            f"downsample {req.downsample} leaves fewer than 16 pixels of a {min(size)}-pixel side"
        )
    # Read at the downsample (emprocess.images): the full-resolution slice is never held.
    if req.channel_files is not None:
        channel = req.channel
        assert channel is not None  # checked by the model
        files = [req.img, *req.channel_files]
        image = read_channel_files(files, channel, req.downsample, max_pixels=max_pixels)
    else:
        image = read_image(req.img, req.channel, req.downsample, max_pixels=max_pixels)
    if req.intensity_window is not None:
        image = to_uint8(image, (req.intensity_window[0], req.intensity_window[1]))
    return image, size


def _read_stored(url: str, described: dict[str, Any], params: AlignParams) -> Any:
    """The stored features and header at ``url``, or None when absent or not ours."""
    try:
        data = storage.read_bytes(url, max_bytes=max_encoded_bytes(params.max_features))
        features, header = decode_features(data, max_encoded_bytes(params.max_features))
    except ObjectNotFound:
        return None
    except InvalidInput as e:  # too large, truncated, not ours: extract again
        log.warning("stored features %s are unusable (%s): extracting again", url, e)
        return None
    if header.get("digest") != described["digest"]:
        log.warning("stored features %s were made by another recipe: extracting again", url)
        return None
    return features, header


def slice_features(
    req: FeaturesRequest, params: AlignParams, *, max_pixels: int
) -> tuple[SliceFeatures, dict[str, Any], bool, str]:
    """The slice's features: read when stored, else extracted (from a slice within
    ``max_pixels``) and stored.

    Returns:
        (features, header, stored, url): ``stored`` is True when they were read, not
        extracted; ``url`` is where they are.

    Raises:
        InvalidInput: the run's process bucket does not exist (no such run).
    """
    url, described = features_url(req, params)
    found = _read_stored(url, described, params)
    if found is not None:
        return found[0], found[1], True, url
    image, (width, height) = load_slice(req, max_pixels=max_pixels)
    features = extract_features(image, params)
    del image
    header = {**described, "source_width": width, "source_height": height}
    try:
        storage.write_bytes(url, encode_features(features, header), "application/octet-stream")
    except BucketNotFound:
        raise InvalidInput(
            f"cannot store the features of {req.img}: process bucket "
            f"{storage.parse_url(url).bucket} does not exist (is run {req.run_id!r} created?)"
        ) from None
    log.info("extracted %d features of %s into %s", len(features.xy), req.img, url)
    return features, header, False, url


def features_request(req: FeaturesRequest, *, max_pixels: int) -> dict[str, Any]:
    """POST /features: extract (or find) one slice's features; answers where and how many."""
    params = parse(AlignParams, req.params)
    features, header, stored, url = slice_features(req, params, max_pixels=max_pixels)
    return {
        "features": url,
        "count": len(features.xy),
        "width": features.width,
        "height": features.height,
        "source_width": header["source_width"],
        "source_height": header["source_height"],
        "already_stored": stored,
    }


def _check_source_sizes(pre: dict[str, Any], post: dict[str, Any], req: AlignRequest) -> None:
    """services.align.check_sizes on the sizes the stored headers record."""
    w0, h0 = pre["source_width"], pre["source_height"]
    w1, h1 = post["source_width"], post["source_height"]
    if max(w0, w1) > MAX_SIZE_RATIO * min(w0, w1) or max(h0, h1) > MAX_SIZE_RATIO * min(h0, h1):
        raise InvalidInput(
            f"pre {req.pre} is {w0}x{h0} but post {req.post} is {w1}x{h1}: "
            f"sizes differ by more than {MAX_SIZE_RATIO}x"
        )


def align_with_features(req: AlignRequest, *, max_pixels: int) -> dict[str, Any]:
    """POST / with ``run_id``: match the two slices' stored features (see the module);
    slices are read within ``max_pixels``."""
    params = parse(AlignParams, req.params)
    sides = [FeaturesRequest.of_pair(req, "pre"), FeaturesRequest.of_pair(req, "post")]
    with ThreadPoolExecutor(2) as pool:
        (f_pre, h_pre, s_pre, _), (f_post, h_post, s_post, _) = pool.map(
            lambda side: slice_features(side, params, max_pixels=max_pixels), sides
        )
    _check_source_sizes(h_pre, h_post, req)
    decoded: list[bool] = []

    def images() -> tuple[np.ndarray, np.ndarray]:
        decoded.append(True)
        log.info("no model from the stored features of %s -> %s: decoding for the retries",
                 req.post, req.pre)  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            loaded = pool.map(lambda side: load_slice(side, max_pixels=max_pixels), sides)
            pre, post = (image for image, _ in loaded)
        return pre, post

    result = align_features(f_pre, f_post, params, images)
    answer = result.model_dump(mode="json")
    answer["features"] = {
        "pre": "stored" if s_pre else "computed",
        "post": "stored" if s_post else "computed",
        "retry_decoded": bool(decoded),
    }
    log.info(
        "aligned %s -> %s at 1/%d from %s/%s features: affine %s (%d inliers), "
        "translation %s, retry decoded %s, %.2f s",
        req.post, req.pre, req.downsample, answer["features"]["pre"],
        answer["features"]["post"], result.affine_found, result.affine_inliers,
        result.translation_found, bool(decoded), result.seconds,
    )  # fmt: skip
    return answer


def register_features(app: Flask, *, max_pixels: int) -> None:
    """Add POST /features to the alignment service's app (slices within ``max_pixels``)."""

    @app.post("/features")
    def features() -> Any:
        req = parse(FeaturesRequest, json_body())
        return jsonify(features_request(req, max_pixels=max_pixels))
