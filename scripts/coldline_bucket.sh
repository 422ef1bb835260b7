#!/usr/bin/env bash
# Move a bucket's objects to Coldline storage DAYS days after they were written.
set -euo pipefail

DEFAULT_DAYS=30

usage() {
    cat <<USAGE
Usage: coldline_bucket.sh [--dry-run] BUCKET [DAYS]

Set a lifecycle rule on BUCKET (NAME or gs://NAME): every Standard or Nearline
object moves to the COLDLINE storage class DAYS days after it was written
(default $DEFAULT_DAYS; 0 moves all of them at the next lifecycle pass, which
Google runs about once a day). Coldline is cheap to keep but charges per read
and for at least 90 days of storage: use it for volumes no one views often.

This replaces the bucket's lifecycle rules (for example a delete rule set by
delete_bucket.sh).

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
    {
      "action": {"type": "SetStorageClass", "storageClass": "COLDLINE"},
      "condition": {"age": $days, "matchesStorageClass": ["STANDARD", "NEARLINE"]}
    }
  ]
}
JSON
)

set_lifecycle_rules "$bucket" "$rule" "objects to COLDLINE $days days after they were written"
