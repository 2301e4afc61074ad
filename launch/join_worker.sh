#!/usr/bin/env bash
# Join this node to a hicra-rl Ray cluster as a worker.
#
#   HEAD_ADDRESS=<head ip>:6379 RAY_AUTH_TOKEN=<token> launch/join_worker.sh [extra `ray start` options...]
#
# RAY_AUTH_TOKEN is the head's token (`ray get-auth-token` on the head; or copy ~/.ray/auth_token here).
# NODE_IP (default: first address of `hostname -I`), NUM_GPUS (default: Ray counts them), plus
# launch/cluster_env.sh. Stop with `ray stop` on this node.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=cluster_env.sh source-path=SCRIPTDIR
source "$HERE/cluster_env.sh"

if [[ -z ${HEAD_ADDRESS:-} ]]; then
  echo "join_worker.sh: set HEAD_ADDRESS=<head ip>:<port> (launch/start_head.sh prints it)" >&2
  exit 2
fi
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && ! -f $HOME/.ray/auth_token ]]; then
  echo "join_worker.sh: the head uses token auth: set RAY_AUTH_TOKEN (run \`ray get-auth-token\` on the head)" >&2
  exit 2
fi
NODE_IP=${NODE_IP:-$(hostname -I | awk '{print $1}')}
gpus=()
[[ -n ${NUM_GPUS:-} ]] && gpus=(--num-gpus "$NUM_GPUS")

exec ray start --address "$HEAD_ADDRESS" --node-ip-address "$NODE_IP" --disable-usage-stats \
  ${gpus[@]+"${gpus[@]}"} "$@"
