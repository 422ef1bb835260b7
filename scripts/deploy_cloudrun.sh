#!/usr/bin/env bash
# Build the two service images with Cloud Build and deploy them as private Cloud Run services.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: deploy_cloudrun.sh --region REGION [--project PROJECT] [options]

Build the alignment service (fiji_cloudrun/) and the emwrite service
(emwrite_docker/) with Cloud Build, deploy both to Cloud Run as private
services (callers need roles/run.invoker; the DAG sends a Google ID token),
one request per instance, and print their URLs for the Airflow connections
ALIGN_CLOUD_RUN and IMG_WRITE (see create_composer_env.sh).

Options:
  --region REGION         Cloud Run region, e.g. us-central1 (required)
  --project PROJECT       cloud project (default: gcloud's configured project)
  --align-name NAME       align service name (default emprocess-align)
  --emwrite-name NAME     emwrite service name (default emprocess-emwrite)
  --image-prefix PREFIX   where images go (default gcr.io/PROJECT), e.g.
                          REGION-docker.pkg.dev/PROJECT/REPO for Artifact Registry
  --tag TAG               image tag (default latest)
  --max-instances N       upper bound of instances per service (default 500)
  --memory SIZE           memory per instance (default 4Gi)
  --service-account SA    identity the services run as; it needs read and
                          write access to the run's buckets (default: the
                          project's Compute Engine default service account)
  --skip-build            deploy the images already built
  --dry-run               print the gcloud commands instead of running them
  -h, --help              show this help

Run it from anywhere; it builds from the repository root.
USAGE
}

# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

region=""
project=""
align_name="emprocess-align"
emwrite_name="emprocess-emwrite"
image_prefix=""
tag="latest"
max_instances=500
memory="4Gi"
service_account=""
skip_build=0
while (($#)); do
    case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-build) skip_build=1 ;;
    --region) need_value "$@"; region=$2; shift ;;
    --project) need_value "$@"; project=$2; shift ;;
    --align-name) need_value "$@"; align_name=$2; shift ;;
    --emwrite-name) need_value "$@"; emwrite_name=$2; shift ;;
    --image-prefix) need_value "$@"; image_prefix=${2%/}; shift ;;
    --tag) need_value "$@"; tag=$2; shift ;;
    --max-instances) need_value "$@"; max_instances=$2; shift ;;
    --memory) need_value "$@"; memory=$2; shift ;;
    --service-account) need_value "$@"; service_account=$2; shift ;;
    -*) die_usage "unknown option $(q "$1")" ;;
    *) die_usage "unexpected argument $(q "$1")" ;;
    esac
    shift
done
if [[ -z $region ]]; then
    die_usage "--region is required"
fi
if ! [[ $max_instances =~ ^[1-9][0-9]*$ ]]; then
    die_usage "--max-instances must be a whole number >= 1, got $(q "$max_instances")"
fi
for name in "$align_name" "$emwrite_name"; do
    if ! [[ $name =~ ^[a-z]([a-z0-9-]{0,47}[a-z0-9])?$ ]]; then
        die_usage "service name $(q "$name") is not valid on Cloud Run: lowercase letters, digits and '-', starting with a letter, at most 49 characters"
    fi
done

if ((DRY_RUN)); then
    say "dry run: printing the commands, running none"
fi
if [[ -z $project ]]; then
    capture project PROJECT gcloud config get-value project
    if [[ -z $project ]]; then
        die "no project: pass --project or run 'gcloud config set project PROJECT'"
    fi
fi
image_prefix=${image_prefix:-gcr.io/$project}
align_image="$image_prefix/$align_name:$tag"
emwrite_image="$image_prefix/$emwrite_name:$tag"

cd "$REPO_ROOT"
if ((!skip_build)); then
    say "building $align_image (fiji_cloudrun/Dockerfile)"
    run gcloud builds submit --project="$project" --config=fiji_cloudrun/cloudbuild.yaml \
        --substitutions="_IMAGE=$align_image" .
    say "building $emwrite_image (emwrite_docker/Dockerfile)"
    run gcloud builds submit --project="$project" --config=emwrite_docker/cloudbuild.yaml \
        --substitutions="_IMAGE=$emwrite_image" .
fi

# Private, one request per instance (the services are single-threaded by design),
# 2 CPUs, requests of up to 15 minutes.
deploy_flags=(
    --project="$project" --region="$region" --platform=managed
    --no-allow-unauthenticated --concurrency=1 --cpu=2 --memory="$memory"
    --timeout=900 --max-instances="$max_instances" --quiet
)
if [[ -n $service_account ]]; then
    deploy_flags+=(--service-account="$service_account")
fi
say "deploying $align_name"
run gcloud run deploy "$align_name" --image="$align_image" "${deploy_flags[@]}"
say "deploying $emwrite_name"
run gcloud run deploy "$emwrite_name" --image="$emwrite_image" "${deploy_flags[@]}"

say "looking up the service URLs"
align_url="" emwrite_url=""
capture align_url "https://$align_name-URL" gcloud run services describe "$align_name" \
    --project="$project" --region="$region" --format='value(status.url)'
capture emwrite_url "https://$emwrite_name-URL" gcloud run services describe "$emwrite_name" \
    --project="$project" --region="$region" --format='value(status.url)'

say "service URLs (Airflow connections):"
printf 'ALIGN_CLOUD_RUN=%s\n' "$align_url"
printf 'IMG_WRITE=%s\n' "$emwrite_url"
say "next: scripts/create_composer_env.sh ENV --location $region --project $project --align-url $align_url --emwrite-url $emwrite_url"
