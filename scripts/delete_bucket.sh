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
    {"action": {"type": "Delete"}, "condition": {"age": $days}}
  ]
}
JSON
)

if ((DRY_RUN)); then
    say "dry run: printing the commands, running none"
fi
say "lifecycle rule for gs://$bucket: delete objects $days days after they were written:"
printf '%s\n' "$rule"
temp_file "$rule"
run gcloud storage buckets update "gs://$bucket" --lifecycle-file="$TEMP_FILE"
say "objects of gs://$bucket will be deleted by Google's next lifecycle pass once $days days old"
