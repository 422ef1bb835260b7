#!/usr/bin/env python3
"""Ingest a colour (RGB(A)) image stack with the pipeline, here, and print its neuroglancer layer.

A thin command on top of the workflow (what ``emprocess run`` does, with the run
configuration a colour stack needs): it finds the slices SRC/TEMPLATE % z (minz..maxz
default to the first and last found), reads the channel count from the first slice,
and runs the DAG through real Airflow with both services on this machine, with
``channels`` set, ``skip_align`` (the stack is taken as aligned; ``--align`` aligns it
on ``--align-channel``) and ``clip-limit`` 0 (the pixels as given). The run writes
the multiscale volumes every run writes: SOURCE_ng_ID/neuroglancer/jpeg (the first
three channels as RGB JPEG) and SOURCE_chunk_ID/neuroglancer/raw (every channel,
lossless). The command prints a neuroglancer image layer (JSON) of the JPEG volume
(``--raw``: the lossless one) with the pipeline's RGB shader; ``--state`` a whole
viewer state; ``--print-conf`` only prints the run configuration (to trigger the run on
Composer instead: ``emprocess trigger --conf``).

SRC is a folder (its parent becomes the storage root and its name the bucket, as in
``emprocess run``) or gs://BUCKET[/PATH]. Slices stored one grey file per channel:
give ``--channel-template`` once per channel, in channel order (the run's
``channel_templates``), instead of ``--template``.

Before the pipeline did this, the script wrote one unsharded raw scale to any DEST:
the run's buckets replace DEST (``--id`` names the run), the pipeline chooses the
chunks (no ``--chunk``), and an existing volume is never replaced (no ``--overwrite``;
re-running the same id redoes nothing finished, another id writes anew).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from emprocess import storage
from emprocess.errors import EmprocessError, InvalidInput, NotFound
from emprocess.imageinfo import HEADER_BYTES, image_header
from emprocess.settings import StorageEnv, load
from emprocess.view import geometry_from_info, viewer_state
from emprocess.workflow.conf import RunConf, parse_conf
from emprocess.workflow.slicenames import check_template, template_prefix

log = logging.getLogger("ingest_multichannel_small")


def source_location(src: str) -> tuple[str, str]:
    """(bucket, key prefix) of SRC; a folder's parent becomes the storage root."""
    if src.startswith("gs://"):
        loc = storage.parse_url(src.rstrip("/") + "/", allow_empty_key=True)
        return loc.bucket, loc.key
    folder = Path(src.removeprefix("file://")).expanduser().resolve()
    if not folder.is_dir():
        raise NotFound(f"{src!r} is not a folder (nor a gs:// URL)")
    storage.check_bucket_name(folder.name)
    return folder.name, ""


def storage_of(src: str) -> StorageEnv:
    """Where the run's buckets are: a folder's parent is the storage root (as for
    `emprocess run FOLDER`); a gs:// source keeps the environment's storage."""
    if src.startswith("gs://"):
        return storage.settings()
    folder = Path(src.removeprefix("file://")).expanduser().resolve()
    return load(StorageEnv, storage_root=folder.parent)


def find_range(bucket: str, template: str) -> tuple[int, int]:
    """The first and last z whose slice ``template % z`` is in the bucket."""
    prefix = template_prefix(template)
    found = []
    for key in storage.list_keys(f"gs://{bucket}/{prefix}"):
        digits = re.match(r"\d+", key[len(prefix) :])
        if digits and template % int(digits.group()) == key:
            found.append(int(digits.group()))
    if not found:
        raise NotFound(f"no slice named like {template!r} in gs://{bucket}/")
    return min(found), max(found)


def slice_channels(bucket: str, name: str) -> int:
    """The channel count the first slice's header gives (2 to 4), or InvalidInput."""
    url = storage.bucket_url(bucket, name)
    header = image_header(
        storage.read_bytes(url, 0, HEADER_BYTES), lambda s, e: storage.read_bytes(url, s, e)
    )
    if header.channels == 1:
        raise InvalidInput(f"slice {url} is grey (one channel): ingest it with `emprocess run`")
    return header.channels


def build_conf(args: argparse.Namespace) -> RunConf:
    """The run configuration of the stack SRC with the options given."""
    bucket, prefix = source_location(args.src)
    templates = [prefix + t for t in args.channel_template or [args.template]]
    try:
        for template in templates:  # before they are used to find the slices
            check_template(template)
    except ValueError as e:
        raise InvalidInput(str(e)) from None
    template = templates[0]
    minz, maxz = args.minz, args.maxz
    if minz is None or maxz is None:
        first, last = find_range(bucket, template)
        minz = first if minz is None else minz
        maxz = last if maxz is None else maxz
    values: dict[str, Any] = {
        "id": args.id or f"{bucket}-rgb",
        "image": template,
        "minz": minz,
        "maxz": maxz,
        "source": bucket,
        "channels": len(templates)
        if len(templates) > 1
        else args.channels or slice_channels(bucket, template % minz),
        "skip_align": not args.align,
        "clip-limit": args.clip_limit,
        "resolution": args.resolution[0] if len(args.resolution) == 1 else args.resolution,
    }
    if len(templates) > 1:
        values["channel_templates"] = templates
    if args.align:
        channel = args.align_channel
        values["align_channel"] = channel if channel == "mean" else int(channel)
    return parse_conf(values)


def layer_or_state(conf: RunConf, raw: bool, name: str | None, state: bool) -> dict[str, Any]:
    """The neuroglancer image layer of the run's volume, or a whole viewer state (xy view)."""
    url = conf.layout.raw_url if raw else conf.layout.jpeg_url
    info = json.loads(storage.read_bytes(storage.join(url, "info")))
    whole = viewer_state(
        [(name or conf.id, f"precomputed://{url}")], geometry_from_info(info), "xy"
    )
    return whole if state else whole["layers"][0]


def run(conf: RunConf, workdir: Path, chosen: StorageEnv) -> None:
    """The run, as ``emprocess run`` does it: local services, the DAG through real Airflow."""
    from rich.console import Console

    from emprocess.localrun import RunProgress, run_dag
    from emprocess.localsize import size_local_run
    from emprocess.workflow import dag_id

    print(
        f"running {conf.id} of gs://{conf.source}/ (Airflow's home and logs: {workdir})",
        file=sys.stderr,
        flush=True,
    )
    # The bars go to stderr: stdout carries only the layer (or state) JSON.
    progress = RunProgress(conf.source, conf.id, Console(stderr=True))
    run_dag(
        conf, dag_id(1), workdir.resolve(), progress=progress, sizing=size_local_run(),
        storage_settings=chosen,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run, print the layer; 0 ok, 1 failed, 2 bad arguments."""
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="folder or gs://BUCKET[/PATH] of the slices")
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
    parser.add_argument(
        "--channel-template",
        action="append",
        metavar="TEMPLATE",
        help="slices stored one grey file per channel: the template of a channel's files; "
        "once per channel (2 to 4), in channel order",
    )
    parser.add_argument("--minz", type=int, help="first slice (default: the first found)")
    parser.add_argument("--maxz", type=int, help="last slice, inclusive (default: the last found)")
    parser.add_argument("--id", help="run id (default: BUCKET-rgb)")
    parser.add_argument(
        "--channels", type=int, choices=(2, 3, 4), help="channels (default: the first slice's)"
    )
    parser.add_argument("--align", action="store_true", help="align the stack (default: as is)")
    parser.add_argument(
        "--align-channel",
        default="mean",
        help='with --align: the channel to align on (0-based) or "mean" (default)',
    )
    parser.add_argument(
        "--clip-limit", type=float, default=0.0, help="CLAHE clip limit (default 0: off)"
    )
    parser.add_argument("--name", help="layer name (default: the run id)")
    parser.add_argument("--raw", action="store_true", help="the layer of the lossless volume")
    parser.add_argument(
        "--state",
        action="store_true",
        help="print a whole viewer state (dimensions, position, the layer), not just the layer",
    )
    parser.add_argument(
        "--print-conf", action="store_true", help="print the run configuration only; run nothing"
    )
    parser.add_argument(
        "--workdir", default="work", help="folder for Airflow and the service logs (%(default)s)"
    )
    args = parser.parse_args(argv)
    if len(args.resolution) not in (1, 3) or min(args.resolution) <= 0:
        parser.error(f"--resolution needs 1 or 3 numbers > 0, got {args.resolution}")
    if args.align_channel != "mean" and not args.align_channel.isdigit():
        parser.error(
            f'--align-channel must be a channel number or "mean", got {args.align_channel}'
        )
    if args.channel_template is not None and not 2 <= len(args.channel_template) <= 4:
        parser.error(f"--channel-template: give 2 to 4, got {len(args.channel_template)}")
    if args.channel_template and args.channels not in (None, len(args.channel_template)):
        parser.error(
            f"--channels {args.channels} but {len(args.channel_template)} --channel-template"
        )
    for opt in ("minz", "maxz"):
        if getattr(args, opt) is not None and getattr(args, opt) < 0:
            parser.error(f"--{opt} must be >= 0, got {getattr(args, opt)}")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        with storage.use(storage_of(args.src)) as chosen:
            conf = build_conf(args)
            if args.print_conf:
                print(json.dumps(conf.to_json(), indent=2))
                return 0
            run(conf, Path(args.workdir), chosen)
            out = layer_or_state(conf, args.raw, args.name, args.state)
    except EmprocessError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if chosen.storage_root is not None:
        print(
            f"note: neuroglancer cannot read local folders; `emprocess view {conf.id} --source "
            f"{conf.source} --storage-root {chosen.storage_root}` serves and shows the run",
            file=sys.stderr,
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
