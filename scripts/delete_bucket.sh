#!/usr/bin/env bash
# Have a bucket's objects deleted DAYS days after they were written (a lifecycle rule).
set -euo pipefail

DEFAULT_DAYS=1

usage() {
    cat <<USAGE
Usage: delete_bucket.sh [--dry-run] BUCKET [DAYS]

Set a lifecycle rule on BUCKET (NAME or gs://NAME): Google deletes every
object DAYS days after it was written (default $DEFAULT_DAYS; 0 deletes all of
them at the next lifecycle pass, which Google runs about once a day). This is
how a run's SOURCE_tmp_RUN_ID bucket goes away, without listing millions of
objects. The empty bucket stays; remove it later with
  gcloud storage buckets delete gs://BUCKET

This replaces the bucket's lifecycle rules (for example a Coldline rule).
Locally (EMPROCESS_STORAGE_ROOT) use emprocess.storage.set_lifecycle_delete and
'emprocess cleanup' instead.

Options:
  --dry-run   print the gcloud command and the rule instead of running it
  -h, --help  show this help
USAGE
}

# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

parse_bucket_script_args "$@"
if ((${#ARGS[@]} < 1 || ${#ARGS[@]} > 2)); then
    die_usage "expected BUCKET [DAYS], got ${#ARGS[@]} arguments"
fi
bucket=$(bucket_arg "${ARGS[0]}")
days=$(days_arg "${ARGS[1]:-$DEFAULT_DAYS}" 0)

rule=$(
    cat <<JSON
{
  "rule": [
    {"action": {"type": "Delete"}, "condition": {"age": $days}}
  ]
}
JSON
)

set_lifecycle_rules "$bucket" "$rule" "delete objects $days days after they were written"
say "objects of gs://$bucket will be deleted by Google's next lifecycle pass once $days days old"
