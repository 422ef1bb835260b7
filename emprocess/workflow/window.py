"""The run's intensity window, decided once before the run from the conf and a sample of slices.

In the DAG, ``validate`` reads the slices' headers only; an ``auto`` window of 12/16-bit
slices is then measured by the task ``measure_window`` (in the pool), which asks the
alignment service for each sampled file's histogram (POST /histogram,
:func:`measure_window_by_service`), so no slice is decoded in the Airflow worker.
:func:`measure_window` decodes them in-process instead (the CLI, tests); both count the
same samples and give the same window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.volume import source_slice_url
from emprocess.workflow.conf import RunConf

if TYPE_CHECKING:
    import numpy as np

    from emprocess.settings import HttpEnv
    from emprocess.workflow.batch import MiniTask
    from emprocess.workflow.stages import RunInfo

log = logging.getLogger(__name__)

AUTO_SAMPLE_SLICES = 8
"""How many slices, spread evenly from minz to maxz, ``auto`` measures. Their summed
histogram gives the percentiles, so a stack whose contrast drifts gets one window that
covers its whole range; each slice is read at reduced resolution (at most
``AUTO_SAMPLE_PIXELS`` of its pixels, one per block, decoded a band of rows at a time)
and dropped before the next, so the Airflow worker holds one slice's file and a small
sample, never a decoded full slice."""

AUTO_SAMPLE_PIXELS = 4096 * 4096
"""Pixels of each sampled slice that ``auto`` counts: a slice with more is subsampled
(every n-th pixel of every n-th row, which keeps the distribution of the values, where
a block mean would narrow it)."""

MAX_SAMPLE_PIXELS = 32768 * 32768
"""The largest slice ``auto`` decodes (emwrite's limit)."""

HISTOGRAM_STAGE = "histogram"
"""Stage name of the /histogram mini-tasks (logs, failure records)."""


def sample_slices(minz: int, maxz: int, count: int = AUTO_SAMPLE_SLICES) -> list[int]:
    """``count`` slice numbers spread evenly over minz..maxz, both ends included."""
    n = maxz - minz + 1
    if n <= count:
        return list(range(minz, maxz + 1))
    return sorted({minz + round(i * (n - 1) / (count - 1)) for i in range(count)})


def sample_step(width: int, height: int, pixels: int = AUTO_SAMPLE_PIXELS) -> int:
    """The smallest n such that every n-th pixel of every n-th row is at most ``pixels``."""
    from emprocess.kernels.intensity import sample_step as step_of

    return step_of(width, height, pixels)


def measured_channels(conf: RunConf) -> int:
    """How many channels of each sampled slice ``auto`` counts: every channel of a
    grey or ``channel_templates`` stack; of colour files the colour ones (alpha, the
    last channel of a 2- or 4-channel file, is left out: it is mostly one value)."""
    if conf.channel_templates is not None or conf.channels in (1, 3):
        return conf.channels
    return conf.channels - 1


def measure_window(conf: RunConf, count: int = AUTO_SAMPLE_SLICES) -> tuple[float, float]:
    """The ``auto`` window: saturating percentiles of the summed histogram of sampled slices.

    One window for the whole run, every channel included: with ``channels`` > 1 the
    histogram counts the samples of every colour channel (:func:`measured_channels`),
    not a grey conversion, so each channel's range is inside the window; the channels
    keep their balance (one window maps them all alike).

    Raises:
        InvalidInput: when a sampled slice cannot be decoded, or the sample has one grey level.
    """
    import numpy as np

    from emprocess.images import check_image, decode_image
    from emprocess.kernels.intensity import histogram, window_from_histogram

    colour = conf.channels > 1 and conf.channel_templates is None
    kept = measured_channels(conf)

    def hist_of(z: int) -> np.ndarray:
        hists = []
        for name in conf.channel_files(z):
            url = source_slice_url(conf.source, name)
            data = storage.read_bytes(url)
            layout = check_image(data, url, MAX_SAMPLE_PIXELS)
            step = sample_step(layout.width, layout.height, AUTO_SAMPLE_PIXELS)
            channels: Literal["all"] | None = "all" if colour else None
            image = decode_image(
                data, url, MAX_SAMPLE_PIXELS, channels=channels, factor=step, subsample=True
            )
            del data
            if colour:
                image = image[:, :, :kept]
            hists.append(histogram(image))
            del image
        return np.asarray(sum(hists))

    zs = sample_slices(conf.minz, conf.maxz, count)
    hists = [hist_of(z) for z in zs]  # one at a time: a slice may be GBs on the worker
    bins = max(len(h) for h in hists)
    total = sum(np.pad(h, (0, bins - len(h))) for h in hists)
    window = window_from_histogram(np.asarray(total))
    log.info("intensity window %s from slices %s (%d channel(s) each)", window, zs, kept)
    return window


def plan_histograms(conf: RunConf) -> list[MiniTask]:
    """One POST /histogram per file of each sampled slice (``z000012``, or ``z000012c1``
    for channel 1's file of ``channel_templates``); index = position."""
    from emprocess.layout import slice_task_name
    from emprocess.models import HistogramRequest
    from emprocess.workflow.batch import MiniTask

    colour = conf.channels > 1 and conf.channel_templates is None
    kept = measured_channels(conf) if colour else 1
    files = [
        (slice_task_name(z) + (f"c{c}" if conf.channel_templates is not None else ""), name)
        for z in sample_slices(conf.minz, conf.maxz)
        for c, name in enumerate(conf.channel_files(z))
    ]
    return [
        MiniTask(
            index=i,
            name=task_name,
            path="/histogram",
            payload=HistogramRequest(
                img=source_slice_url(conf.source, name),
                sample_pixels=AUTO_SAMPLE_PIXELS,
                channels=kept,
            ).payload(),
        )
        for i, (task_name, name) in enumerate(files)
    ]


def summed_histogram(answers: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The sum of /histogram answers (grey levels and their counts) as counts per level."""
    import numpy as np

    bins = 65536 if any(a["bits"] > 8 for a in answers) else 256
    total = np.zeros(bins, dtype=np.int64)
    for a in answers:
        np.add.at(total, np.asarray(a["values"], dtype=np.int64), np.asarray(a["counts"]))
    return total


def measure_window_by_service(
    conf: RunConf, base_url: str, settings: HttpEnv | None = None
) -> tuple[float, float]:
    """The ``auto`` window from the alignment service's histograms of the sampled slices.

    The same window as :func:`measure_window`, without decoding a slice here. The
    requests are a batch like every stage's: retried, answers cached under
    ``align/window_cache/`` of the run's process bucket (which must exist), failures
    recorded, so a retried or re-triggered run asks only what is missing.

    Raises:
        BatchError: a request failed for good (a 4xx names what the service refused:
            not an image, over its limits).
        InvalidInput: the sample has one grey level.
    """
    from emprocess.kernels.intensity import window_from_histogram
    from emprocess.layout import WINDOW_CACHE
    from emprocess.workflow.batch import read_cached, run_batch

    tasks = plan_histograms(conf)
    cache = conf.layout.process_url(WINDOW_CACHE)
    run_batch(
        tasks,
        base_url=base_url,
        cache_url=cache,
        stage=HISTOGRAM_STAGE,
        settings=settings,
        failure_url=conf.layout.failure_url(HISTOGRAM_STAGE),
    )
    answers = read_cached(tasks, cache)
    window = window_from_histogram(summed_histogram([answers[t.name] for t in tasks]))
    log.info(
        "intensity window %s from %d files of slices %s (histograms by %s)",
        window, len(tasks), sample_slices(conf.minz, conf.maxz), base_url,
    )  # fmt: skip
    return window


def settle_window(info: RunInfo, base_url: str) -> RunInfo:
    """``measure_window``: ``info`` with a pending ``auto`` window measured by the alignment
    service at ``base_url`` (:func:`measure_window_by_service`); any other ``info`` as it
    is, nothing sent.

    The answers are cached in the run's process bucket, so this creates that bucket as
    ``create_env`` does (same location and class; ``create_env`` then finds it).
    """
    from emprocess.workflow.stages import RUN_STORAGE_CLASS, run_location

    if not info.window_pending:
        return info
    conf = info.conf
    storage.create_bucket(
        conf.layout.process,
        project=conf.project,
        location=run_location(conf),
        storage_class=RUN_STORAGE_CLASS,
    )
    window = measure_window_by_service(conf, base_url)
    return info.model_copy(update={"intensity_window": window, "window_pending": False})


def window_is_measured(conf: RunConf, slice_bits: int) -> bool:
    """Whether the run's window is measured on its slices: ``auto`` on 12/16-bit slices."""
    return conf.intensity == "auto" and slice_bits > 8


def decide_window(
    conf: RunConf, slice_bits: int, measure: bool = True
) -> tuple[float, float] | None:
    """The window the run applies, from conf ``intensity`` and the slices' bit depth.

    Args:
        measure: whether to measure an ``auto`` window here (:func:`measure_window`);
            False leaves it to the DAG's ``measure_window`` task (None is returned).

    Returns:
        (low, high) grey levels, or None for today's mapping (``full``, and ``auto`` on
        8-bit slices: they are used as they are).

    Raises:
        InvalidInput: an explicit window beyond the range of 8-bit slices, or a 16-bit
            raw volume asked of 8-bit slices.
    """
    if conf.raw_bits > slice_bits:
        raise InvalidInput(
            f"raw_bits: {conf.raw_bits} keeps 16-bit values, but the slices are "
            f"{slice_bits}-bit; leave raw_bits at 8"
        )
    if conf.intensity == "full":
        return None
    if conf.intensity == "auto":
        return measure_window(conf) if measure and window_is_measured(conf, slice_bits) else None
    low, high = float(conf.intensity[0]), float(conf.intensity[1])
    top = (1 << slice_bits) - 1
    if high > top:
        raise InvalidInput(
            f"intensity: window [{low:g}, {high:g}] goes beyond the {slice_bits}-bit slices' "
            f'range 0..{top}; give a window within it, or "auto"'
        )
    return low, high
