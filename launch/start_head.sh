#!/usr/bin/env bash
# Start the Ray head of a hicra-rl cluster on this node (the node that runs each job's driver).
#
#   launch/start_head.sh [extra `ray start` options...]
#
# Env: HEAD_IP (default: this node's first address from `hostname -I`), RAY_PORT (6379),
# DASHBOARD_PORT (8265; the job API that launch/submit.sh talks to), DASHBOARD_HOST (0.0.0.0: every
# interface, so other machines can submit jobs; 127.0.0.1 keeps the job API on this node), NUM_GPUS
# (default: Ray counts them), plus launch/cluster_env.sh (NCCL, auth, HF_HOME, HICRA_DATA_ROOT).
# The dashboard's job API runs any command it is sent: on an address other machines reach it needs
# RAY_AUTH_MODE=token (cluster_env.sh's default; this script makes the token), else the script refuses
# unless HICRA_ALLOW_OPEN_DASHBOARD=1 (see launch/README.md, "Security"). Stop with `ray stop` on this
# node (it stops every Ray process of this user on the node).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster_env.sh source-path=SCRIPTDIR
source "$HERE/cluster_env.sh"

HEAD_IP=${HEAD_IP:-$(hostname -I | awk '{print $1}')}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
DASHBOARD_HOST=${DASHBOARD_HOST:-0.0.0.0}
RAY_CLI=${RAY_CLI:-ray}
if [[ $DASHBOARD_HOST != 127.* && $DASHBOARD_HOST != localhost && ${RAY_AUTH_MODE:-} != token \
      && ${HICRA_ALLOW_OPEN_DASHBOARD:-0} != 1 ]]; then
  echo "start_head.sh: the dashboard (job API, runs any command) would listen on $DASHBOARD_HOST without" \
       "token auth (RAY_AUTH_MODE=${RAY_AUTH_MODE:-unset}); set RAY_AUTH_MODE=token, or" \
       "DASHBOARD_HOST=127.0.0.1, or HICRA_ALLOW_OPEN_DASHBOARD=1 on a trusted network" >&2
  exit 2
fi
gpus=()
[[ -n ${NUM_GPUS:-} ]] && gpus=(--num-gpus "$NUM_GPUS")
# with RAY_AUTH_MODE=token a head refuses to start without a token: make one (kept if it exists)
if [[ ${RAY_AUTH_MODE:-} == token && -z ${RAY_AUTH_TOKEN:-} ]]; then
  "$RAY_CLI" get-auth-token --generate > /dev/null
fi

"$RAY_CLI" start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" \
  --dashboard-host "$DASHBOARD_HOST" --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats \
  ${gpus[@]+"${gpus[@]}"} "$@"

# the job API listens on DASHBOARD_HOST: the hint names that address, the node's (HEAD_IP) only when it
# listens on every interface (with DASHBOARD_HOST=127.0.0.1, HEAD_IP:8265 would be refused)
case $DASHBOARD_HOST in
  0.0.0.0 | "::" | "[::]") JOB_API_HOST=$HEAD_IP ;;
  *) JOB_API_HOST=$DASHBOARD_HOST ;;
esac

cat <<MSG

hicra-rl head is up (job API on $DASHBOARD_HOST:$DASHBOARD_PORT, auth: ${RAY_AUTH_MODE:-none}).
  join a worker:  HEAD_ADDRESS=$HEAD_IP:$RAY_PORT RAY_AUTH_TOKEN=\$($RAY_CLI get-auth-token) launch/join_worker.sh
  submit a job:   RAY_ADDRESS=http://$JOB_API_HOST:$DASHBOARD_PORT launch/submit.sh +paper=qwen3_4b_base ...
  cluster state:  ray status --address $HEAD_IP:$RAY_PORT
MSG
