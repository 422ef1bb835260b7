#!/usr/bin/env bash
# Create a Cloud Composer 3 (Airflow 3) environment that runs the emprocess DAGs.
set -euo pipefail

DEFAULT_IMAGE_VERSION="composer-3-airflow-3.1.7-build.13"
DEFAULT_POOL_SLOTS=512

usage() {
    cat <<USAGE
Usage: create_composer_env.sh ENV --location LOCATION [options]

Create the Cloud Composer 3 environment ENV with Airflow 3 and set it up for
the emprocess DAGs (emprocess_width{W}_v{VERSION}):
  1. create the environment (skip with --skip-create);
  2. Airflow connections ALIGN_CLOUD_RUN and IMG_WRITE, as the environment
     variables AIRFLOW_CONN_ALIGN_CLOUD_RUN / AIRFLOW_CONN_IMG_WRITE holding the
     Cloud Run service URLs (looked up when not given);
  3. let the environment's service account invoke both services;
  4. the PyPI packages the DAG needs beyond the Composer image
     (scripts/composer-requirements.txt: OpenCV, libvips, SciPy, ...), and the
     extra packages of --pypi-file;
  5. the Airflow pool http_requests (every batch task runs in it), and the
     Airflow setting core.parallelism (tasks running at once per scheduler;
     Airflow's default, 32, would cap a width-128 run) set to the pool's slots;
  6. upload the DAG file emprocess.py, the emprocess/ package next to it, and
     an .airflowignore that keeps Airflow from parsing the package as DAGs
     (this replaces an .airflowignore already in the DAG folder).
Each environment update takes several minutes.

Options:
  --location LOCATION    Composer region, e.g. us-central1 (required)
  --project PROJECT      cloud project (default: gcloud's configured project)
  --image-version V      Composer image (default \$COMPOSER_IMAGE_VERSION, else
                         $DEFAULT_IMAGE_VERSION); list them with
                         gcloud composer environments list-upgrades, or see
                         cloud.google.com/composer/docs/composer-versions
  --environment-size S   small, medium or large (default small)
  --service-account SA   service account of the environment (default: the
                         Compute Engine default service account)
  --align-url URL        URL of the align service (default: looked up)
  --emwrite-url URL      URL of the emwrite service (default: looked up)
  --run-region REGION    region of the Cloud Run services (default LOCATION)
  --align-name NAME      align service name (default emprocess-align)
  --emwrite-name NAME    emwrite service name (default emprocess-emwrite)
  --pool-slots N         slots of the pool http_requests, and core.parallelism
                         (default $DEFAULT_POOL_SLOTS: four runs of width 128)
  --pypi-file FILE       requirements file of more PyPI packages to install
  --skip-create          the environment exists; only configure it
  --dry-run              print the gcloud commands instead of running them
  -h, --help             show this help

Then trigger a run, e.g.:
  gcloud composer environments run ENV --location LOCATION dags trigger -- \\
      emprocess_width32_v$DAG_VERSION --conf '{"id": "RUN_ID", "image": "img.%05d.png", ...}'
USAGE
}

# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POOL="http_requests"
# The DAG ids carry the workflow version: emprocess_width{W}_v{VERSION}.
DAG_VERSION=$(sed -n 's/^VERSION = "\(.*\)"$/\1/p' "$REPO_ROOT/emprocess/workflow/__init__.py" 2>/dev/null || true)
DAG_VERSION=${DAG_VERSION:-VERSION}
POOL_DESCRIPTION="emprocess batch tasks: each sends HTTP mini-tasks to the Cloud Run services"

env_name=""
location=${CLOUDSDK_COMPOSER_LOCATION:-}
project=""
image_version=${COMPOSER_IMAGE_VERSION:-$DEFAULT_IMAGE_VERSION}
environment_size="small"
service_account=""
align_url=""
emwrite_url=""
run_region=""
align_name="emprocess-align"
emwrite_name="emprocess-emwrite"
pool_slots=$DEFAULT_POOL_SLOTS
pypi_file=""
skip_create=0
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-create) skip_create=1 ;;
    --location) need_value "$@"; location=$2; shift ;;
    --project) need_value "$@"; project=$2; shift ;;
    --image-version) need_value "$@"; image_version=$2; shift ;;
    --environment-size) need_value "$@"; environment_size=$2; shift ;;
    --service-account) need_value "$@"; service_account=$2; shift ;;
    --align-url) need_value "$@"; align_url=${2%/}; shift ;;
    --emwrite-url) need_value "$@"; emwrite_url=${2%/}; shift ;;
    --run-region) need_value "$@"; run_region=$2; shift ;;
    --align-name) need_value "$@"; align_name=$2; shift ;;
    --emwrite-name) need_value "$@"; emwrite_name=$2; shift ;;
    --pool-slots) need_value "$@"; pool_slots=$2; shift ;;
    --pypi-file) need_value "$@"; pypi_file=$2; shift ;;
    -*) die_usage "unknown option $(q "$1")" ;;
    *)
        if [[ -n $env_name ]]; then
            die_usage "unexpected argument $(q "$1"): ENV is already $(q "$env_name")"
        fi
        env_name=$1
        ;;
    esac
    shift
done
if [[ -z $env_name ]]; then
    die_usage "ENV (the environment name) is required"
fi
if ! [[ $env_name =~ ^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; then
    die_usage "environment name $(q "$env_name") is not valid: lowercase letters, digits and '-', starting with a letter, at most 63 characters"
fi
if [[ -z $location ]]; then
    die_usage "--location is required"
fi
if ! [[ $image_version =~ ^composer-3-airflow-3 ]]; then
    die_usage "image version $(q "$image_version") is not Composer 3 with Airflow 3 (composer-3-airflow-3...); the DAGs need Airflow 3"
fi
case $environment_size in
small | medium | large) ;;
*) die_usage "--environment-size must be small, medium or large, got $(q "$environment_size")" ;;
esac
if ! [[ $pool_slots =~ ^[1-9][0-9]*$ ]]; then
    die_usage "--pool-slots must be a whole number >= 1, got $(q "$pool_slots")"
fi
for url in "$align_url" "$emwrite_url"; do
    if [[ -n $url && ! $url =~ ^https?://[^/,=[:space:]]+$ ]]; then
        die_usage "service URL $(q "$url") must be http(s)://HOST[:PORT] with no path"
    fi
done
if [[ -n $pypi_file && ! -f $pypi_file ]]; then
    die_usage "--pypi-file $(q "$pypi_file") is not a file"
fi
for path in "$REPO_ROOT/emprocess.py" "$REPO_ROOT/emprocess/__init__.py" "$REPO_ROOT/scripts/composer-requirements.txt"; do
    if [[ ! -f $path ]]; then
        die "$path is missing; run this script from a checkout of clio-ingest"
    fi
done
run_region=${run_region:-$location}

if ((DRY_RUN)); then
    say "dry run: printing the commands, running none"
fi
if [[ -z $project ]]; then
    capture project PROJECT gcloud config get-value project
    if [[ -z $project ]]; then
        die "no project: pass --project or run 'gcloud config set project PROJECT'"
    fi
fi
env_flags=(--location="$location" --project="$project")

if ((!skip_create)); then
    say "1. creating Composer environment $env_name ($image_version, $environment_size) in $location"
    create=(gcloud composer environments create "$env_name" "${env_flags[@]}"
        --image-version="$image_version" --environment-size="$environment_size")
    if [[ -n $service_account ]]; then
        create+=(--service-account="$service_account")
    fi
    run "${create[@]}"
else
    say "1. using the existing Composer environment $env_name"
fi

say "2. Airflow connections ALIGN_CLOUD_RUN and IMG_WRITE"
align_looked_up=0 emwrite_looked_up=0
if [[ -z $align_url ]]; then
    align_looked_up=1
    capture align_url "https://$align_name-URL" gcloud run services describe "$align_name" \
        --project="$project" --region="$run_region" --format='value(status.url)'
fi
if [[ -z $emwrite_url ]]; then
    emwrite_looked_up=1
    capture emwrite_url "https://$emwrite_name-URL" gcloud run services describe "$emwrite_name" \
        --project="$project" --region="$run_region" --format='value(status.url)'
fi
if [[ -z $align_url || -z $emwrite_url ]]; then
    die "could not find the Cloud Run services $align_name / $emwrite_name in $run_region; deploy them with deploy_cloudrun.sh or pass --align-url and --emwrite-url"
fi
run gcloud composer environments update "$env_name" "${env_flags[@]}" \
    --update-env-variables="AIRFLOW_CONN_ALIGN_CLOUD_RUN=$align_url,AIRFLOW_CONN_IMG_WRITE=$emwrite_url"

say "3. letting the environment's service account invoke the services"
# Only services on Cloud Run take roles/run.invoker; a URL given by hand may point elsewhere.
invoked=()
if [[ $align_looked_up == 1 || $align_url == https://*.run.app ]]; then
    invoked+=("$align_name")
fi
if [[ $emwrite_looked_up == 1 || $emwrite_url == https://*.run.app ]]; then
    invoked+=("$emwrite_name")
fi
if ((${#invoked[@]})) && [[ -z $service_account ]]; then
    capture service_account "ENV-SERVICE-ACCOUNT" gcloud composer environments describe \
        "$env_name" "${env_flags[@]}" --format='value(config.nodeConfig.serviceAccount)'
fi
if ((${#invoked[@]})) && [[ -n $service_account ]]; then
    for name in "${invoked[@]}"; do
        run gcloud run services add-iam-policy-binding "$name" --project="$project" \
            --region="$run_region" --member="serviceAccount:$service_account" \
            --role=roles/run.invoker --quiet
    done
else
    say "   skipped: grant the environment's service account access to the services yourself"
fi

# One update with every package: each update of an environment takes minutes.
requirements="$REPO_ROOT/scripts/composer-requirements.txt"
if ((DRY_RUN)); then
    packages="PACKAGES-FILE"
else
    packages=$(mktemp "${TMPDIR:-/tmp}/emprocess-pypi.XXXXXX")
    TEMP_PATHS+=("$packages")
    # Requirement lines only: comments and blank lines dropped.
    cat "$requirements" ${pypi_file:+"$pypi_file"} | sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' >"$packages"
fi
say "4. installing the PyPI packages of scripts/composer-requirements.txt${pypi_file:+ and $pypi_file}"
run gcloud composer environments update "$env_name" "${env_flags[@]}" \
    --update-pypi-packages-from-file="$packages"

say "5. pool $POOL with $pool_slots slots, and core.parallelism $pool_slots"
run gcloud composer environments run "$env_name" "${env_flags[@]}" \
    pools set -- "$POOL" "$pool_slots" "$POOL_DESCRIPTION"
# Each DAG sets max_active_tasks to its width itself; parallelism is the cluster-wide cap.
run gcloud composer environments update "$env_name" "${env_flags[@]}" \
    --update-airflow-configs="core-parallelism=$pool_slots"

say "6. uploading emprocess.py and the emprocess/ package to the DAG folder"
# Upload a clean copy: no __pycache__, no editor or test leftovers.
if ((DRY_RUN)); then
    stage="STAGING-DIR"
    say "   (would copy emprocess.py and emprocess/*.py to $stage, with an .airflowignore)"
else
    stage=$(mktemp -d "${TMPDIR:-/tmp}/emprocess-dags.XXXXXX")
    TEMP_PATHS+=("$stage")
    cp "$REPO_ROOT/emprocess.py" "$stage/"
    while IFS= read -r -d '' file; do
        mkdir -p "$stage/${file%/*}"
        cp "$REPO_ROOT/$file" "$stage/$file"
    done < <(cd "$REPO_ROOT" && find emprocess -name '*.py' -not -path '*/__pycache__/*' -print0)
    printf '%s\n' "emprocess/" >"$stage/.airflowignore"
fi
for src in emprocess.py emprocess .airflowignore; do
    run gcloud composer environments storage dags import --environment="$env_name" \
        "${env_flags[@]}" --source="$stage/$src"
done

say "done: environment $env_name in $location"
say "trigger a run with: gcloud composer environments run $env_name --location $location --project $project dags trigger -- emprocess_width32_v$DAG_VERSION --conf '{\"id\": \"RUN_ID\", ...}'"
