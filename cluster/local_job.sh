#!/usr/bin/env bash
# Run a cohortcast job the way a cluster runs it, on this machine: start a local Ray head
# (unless one is already up), `ray job submit` the job with the cluster runtime env, then
# stop the head if this script started it. Used by `make demo`.
#
#   cluster/local_job.sh jobs/train_namd.py --config jobs/configs/namd_debug.yaml [--set a.b=c ...]
#   cluster/local_job.sh JOB ARGS... --then JOB ARGS...   # several jobs in turn on one head
#
# Outputs (runs/, mlruns/) land in this folder: the job runs in Ray's copy of the
# working dir, so `workdir` is set to here.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT="$(pwd)"
NUM_CPUS="${NUM_CPUS:-2}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
GCS_PORT="${GCS_PORT:-6379}"
export RAY_ADDRESS="http://127.0.0.1:${DASHBOARD_PORT}"
# Ray 2.60 heads require a token (written to ~/.ray/auth_token by `ray start`); the
# client side only sends it in token mode, so say so for both.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
# Processes Ray starts run `python` from the first PATH entry: this project's venv.
export PATH="${PROJECT}/.venv/bin:${PATH}"

started=0
if ! ray status --address "127.0.0.1:${GCS_PORT}" >/dev/null 2>&1; then
  ray start --head --port "${GCS_PORT}" --num-cpus "${NUM_CPUS}" --include-dashboard=true \
    --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT}" --disable-usage-stats >/dev/null
  started=1
fi
stop_head() { if [ "${started}" = 1 ]; then ray stop --force >/dev/null 2>&1 || true; fi; }
trap stop_head EXIT

submit() {
  local script="$1"; shift
  ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python "${script}" "$@" --set "workdir=${PROJECT}"
}

# Split the arguments at each --then; a failing job stops the sequence (set -e).
job=()
for arg in "$@"; do
  if [ "${arg}" = "--then" ]; then
    submit "${job[@]}"
    job=()
  else
    job+=("${arg}")
  fi
done
submit "${job[@]}"
