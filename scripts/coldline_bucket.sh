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

args=()
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; args+=("$@"); break ;;
    -*) die_usage "unknown option $(q "$1")" ;;
    *) args+=("$1") ;;
    esac
    shift
done
if ((${#args[@]} < 1 || ${#args[@]} > 2)); then
    die_usage "expected BUCKET [DAYS], got ${#args[@]} arguments"
fi
bucket=$(bucket_arg "${args[0]}")
days=$(days_arg "${args[1]:-$DEFAULT_DAYS}" 0)

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

if ((DRY_RUN)); then
    say "dry run: printing the commands, running none"
fi
say "lifecycle rule for gs://$bucket: objects to COLDLINE $days days after they were written:"
printf '%s\n' "$rule"
temp_file "$rule"
run gcloud storage buckets update "gs://$bucket" --lifecycle-file="$TEMP_FILE"
