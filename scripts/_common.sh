# shellcheck shell=bash
# Helpers shared by the scripts in this folder. Sourced, never run on its own.
#
# Every script prints each command before it runs it ("+ gcloud ..."), quoted so
# that it can be pasted into a shell; with DRY_RUN=1 it prints and runs nothing.
# Each script defines usage() before sourcing this file.

DRY_RUN=0

# The script's name, for messages.
PROG=${0##*/}

# Print a message and the usage synopsis (usage's first paragraph) to stderr; exit 2.
die_usage() {
    {
        printf '%s: %s\n' "$PROG" "$1"
        usage | awk 'NF == 0 { exit } { print }' || true
        printf 'Run %s --help for details.\n' "$PROG"
    } >&2
    exit 2
}

# Print an error to stderr; exit 1.
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# Say what happens next (stdout, so a dry run shows the whole plan in order).
say() {
    printf '==> %s\n' "$*"
}

# Quote one word for a POSIX shell, plainly when that is safe.
shell_quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        q "$1"
    fi
}

# Quote one word in single quotes, for messages: q "it's" -> 'it'\''s'.
# (Bash 3.2, the macOS default, has no ${var@Q}.)
q() {
    printf "'%s'" "${1//\'/\'\\\'\'}"
}

# Print a command line, quoted.
print_cmd() {
    local out="+" word
    for word in "$@"; do
        out+=" $(shell_quote "$word")"
    done
    printf '%s\n' "$out"
}

# Print a command, then run it unless this is a dry run.
run() {
    print_cmd "$@"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

# Print a command and store its output in the variable VAR; in a dry run store
# PLACEHOLDER instead. Usage: capture VAR PLACEHOLDER cmd args...
capture() {
    local __capture_var=$1 __capture_placeholder=$2 __capture_out
    shift 2
    print_cmd "$@"
    if ((DRY_RUN)); then
        __capture_out=$__capture_placeholder
    else
        __capture_out=$("$@")
    fi
    printf -v "$__capture_var" '%s' "$__capture_out"
}

# Echo a bucket name given as NAME or gs://NAME[/]; exit 2 if it breaks GCS's naming rules.
bucket_arg() {
    local name=${1#gs://}
    name=${name%/}
    if [[ $name == */* ]]; then
        die_usage "bucket $(q "$1") names an object path; give the bucket only (NAME or gs://NAME)"
    fi
    if ! [[ $name =~ ^[a-z0-9][a-z0-9._-]*[a-z0-9]$ ]] || ((${#name} < 3 || ${#name} > 222)); then
        die_usage "bucket name $(q "$1") is not valid: 3 to 63 lowercase letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    fi
    if [[ $name != *.* ]] && ((${#name} > 63)); then
        die_usage "bucket name $(q "$1") has ${#name} characters; at most 63 are allowed"
    fi
    printf '%s\n' "$name"
}

# Echo a whole number of days >= MIN (default 0); exit 2 otherwise.
days_arg() {
    local days=$1 min=${2:-0}
    if ! [[ $days =~ ^[0-9]+$ ]] || ((10#$days < min)); then
        die_usage "DAYS must be a whole number >= $min, got $(q "$days")"
    fi
    printf '%d\n' "$((10#$days))"
}

# Check that an option has a value: need_value "$@" (with the option in $1).
need_value() {
    if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then
        die_usage "option $1 needs a value"
    fi
}

# Write TEXT to a new temporary file and set TEMP_FILE to its path; removed at exit.
# (Not to be called inside $(...): the path would not be recorded for removal.)
temp_file() {
    TEMP_FILE=$(mktemp "${TMPDIR:-/tmp}/${PROG%.sh}.XXXXXX")
    TEMP_PATHS+=("$TEMP_FILE")
    printf '%s\n' "$1" >"$TEMP_FILE"
}

TEMP_PATHS=()
cleanup_temp_paths() {
    if ((${#TEMP_PATHS[@]})); then
        rm -rf -- "${TEMP_PATHS[@]}"
    fi
}
trap cleanup_temp_paths EXIT

# Parse the options every bucket script takes (-h/--help, --dry-run, --) and
# collect the positional arguments in the global array ARGS.
parse_bucket_script_args() {
    ARGS=()
    while (($#)); do
        case $1 in
        -h | --help) usage; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        --) shift; ARGS+=("$@"); break ;;
        -*) die_usage "unknown option $(q "$1")" ;;
        *) ARGS+=("$1") ;;
        esac
        shift
    done
    if ((DRY_RUN)); then
        say "dry run: printing the commands, running none"
    fi
}

# Replace the lifecycle rules of gs://BUCKET with RULE_JSON, saying WHAT it does.
set_lifecycle_rules() {
    local bucket=$1 rule=$2 what=$3
    say "lifecycle rule for gs://$bucket: $what:"
    printf '%s\n' "$rule"
    temp_file "$rule"
    run gcloud storage buckets update "gs://$bucket" --lifecycle-file="$TEMP_FILE"
}
