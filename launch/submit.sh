#!/usr/bin/env bash
# Submit one hicra-train run to a running Ray cluster as a Ray job.
#
#   launch/submit.sh [--address URL] [--no-wait] [--submission-id ID] [--] <Hydra overrides...>
#
#   launch/submit.sh --no-wait +paper=qwen3_4b_base trainer.run_dir=/shared/runs/hicra-qwen3-4b
#   ray job logs -f <id>        follow the driver's output (the per-step console lines)
#   ray job status <id>         PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED
#   ray job stop <id>           stop it (resume later with the same trainer.run_dir: trainer.resume=auto)
#   ray job list                every job of the cluster
#
# URL is the dashboard of the head node (default: $RAY_ADDRESS, else http://127.0.0.1:8265); the ray CLI
# commands above read it from RAY_ADDRESS too. The repo is uploaded as the job's working directory with
# launch/runtime_env.yaml ($HICRA_RUNTIME_ENV overrides the file); the entrypoint is
# `python -m hicra_rl.train` ($HICRA_ENTRYPOINT overrides it), run on the head node, which then places
# the learner / rollout / verifier actors on the cluster. Print the resolved config without training:
# add `--cfg job --resolve` to the overrides.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
RUNTIME_ENV=${HICRA_RUNTIME_ENV:-$ROOT/launch/runtime_env.yaml}
read -r -a ENTRYPOINT <<< "${HICRA_ENTRYPOINT:-python -m hicra_rl.train}"
RAY_CLI=${RAY_CLI:-ray}

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

submit_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --address) ADDRESS=$2; shift 2 ;;
    --address=*) ADDRESS=${1#*=}; shift ;;
    --no-wait) submit_args+=(--no-wait); shift ;;
    --submission-id) submit_args+=(--submission-id "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

if [[ ! -f $RUNTIME_ENV ]]; then
  echo "submit.sh: runtime env file $RUNTIME_ENV does not exist" >&2
  exit 2
fi

exec "$RAY_CLI" job submit --address "$ADDRESS" --runtime-env "$RUNTIME_ENV" --working-dir "$ROOT" \
  ${submit_args[@]+"${submit_args[@]}"} -- "${ENTRYPOINT[@]}" "$@"
