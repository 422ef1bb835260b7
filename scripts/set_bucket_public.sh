#!/usr/bin/env bash
# Make a bucket readable by anyone and answer CORS, so neuroglancer can show its volumes.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: set_bucket_public.sh [--dry-run] BUCKET

Make BUCKET (NAME or gs://NAME) public-read and let neuroglancer load it:
  - IAM: allUsers get roles/storage.objectViewer (anyone can read every object);
  - CORS: GET and HEAD from any origin, exposing Content-Type, Range,
    Content-Range and Content-Length (sharded volumes use Range reads).
Needs storage.buckets.setIamPolicy and storage.buckets.update on the bucket,
and the bucket must not enforce public access prevention.

View it with the neuroglancer source
  precomputed://gs://BUCKET/neuroglancer/jpeg

Options:
  --dry-run   print the gcloud commands instead of running them
  -h, --help  show this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# The CORS policy neuroglancer needs (the same as emprocess.storage's make_public).
CORS_JSON='[
  {
    "origin": ["*"],
    "method": ["GET", "HEAD"],
    "responseHeader": ["Content-Type", "Range", "Content-Range", "Content-Length"],
    "maxAgeSeconds": 3600
  }
]'

parse_bucket_script_args "$@"
if ((${#ARGS[@]} != 1)); then
    die_usage "expected one BUCKET, got ${#ARGS[@]} arguments"
fi
bucket=$(bucket_arg "${ARGS[0]}")

say "granting allUsers read access to gs://$bucket"
run gcloud storage buckets add-iam-policy-binding "gs://$bucket" \
    --member=allUsers --role=roles/storage.objectViewer
say "setting the neuroglancer CORS policy on gs://$bucket:"
printf '%s\n' "$CORS_JSON"
temp_file "$CORS_JSON"
run gcloud storage buckets update "gs://$bucket" --cors-file="$TEMP_FILE"
say "gs://$bucket is public-read; neuroglancer source: precomputed://gs://$bucket/neuroglancer/jpeg"
