#!/usr/bin/env bash
# Start the Ray head of a hicra-rl cluster on this node (the node that runs each job's driver).
#
#   launch/start_head.sh [extra `ray start` options...]
#
# Env: HEAD_IP (default: this node's first address from `hostname -I`), RAY_PORT (6379),
# DASHBOARD_PORT (8265; the job API that launch/submit.sh talks to), NUM_GPUS (default: Ray counts
# them), plus launch/cluster_env.sh (NCCL, auth, HF_HOME, HICRA_DATA_ROOT). Stop with `ray stop` on
# this node (it stops every Ray process of this user on the node).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster_env.sh source-path=SCRIPTDIR
source "$HERE/cluster_env.sh"

HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
gpus=()
[[ -n ${NUM_GPUS:-} ]] && gpus=(--num-gpus "$NUM_GPUS")
# with RAY_AUTH_MODE=token a head refuses to start without a token: make one (kept if it exists)
if [[ ${RAY_AUTH_MODE:-} == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
  ray get-auth-token --generate > /dev/null
fi

ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" \
  --dashboard-host 0.0.0.0 --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats \
  ${gpus[@]+"${gpus[@]}"} "$@"

cat <<MSG

hicra-rl head is up.
  join a worker:  HEAD_ADDRESS=$HEAD_IP:$RAY_PORT RAY_AUTH_TOKEN=\$(ray get-auth-token) launch/join_worker.sh
  submit a job:   RAY_ADDRESS=http://$HEAD_IP:$DASHBOARD_PORT launch/submit.sh +paper=qwen3_4b_base ...
  cluster state:  ray status --address $HEAD_IP:$RAY_PORT
MSG
