# shellcheck shell=bash
# Environment shared by every node of a hicra-rl Ray cluster; sourced by start_head.sh and join_worker.sh
# BEFORE `ray start`, so the raylet and every actor it starts (learner ranks, vLLM engines) inherit it.
# Edit for your fabric; anything already set in the calling shell wins.

# Ray token auth (launch/README.md): with this mode the head needs a token (start_head.sh makes one in
# ~/.ray/auth_token), and every worker node and every machine that submits jobs needs the same token:
# RAY_AUTH_TOKEN=<token> (print it on the head with `ray get-auth-token`) or the file copied.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}

# NCCL (learner ranks across GPUs and nodes). The interface that carries inter-node traffic; with
# InfiniBand/RoCE also the HCAs. NCCL_DEBUG=INFO prints the chosen transport at start.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}
# export GLOO_SOCKET_IFNAME=eth0     # gloo groups (CPU side) need an interface NAME when the default is wrong
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# export NCCL_IB_HCA=mlx5            # InfiniBand HCAs to use
# export NCCL_IB_DISABLE=1           # no InfiniBand: TCP sockets only
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

# Models and data: the runtime env (launch/runtime_env.yaml) is offline, so every node reads models from
# an HF cache that is already filled (a shared HF_HOME, or `hf download <model>` on each node) and data
# from HICRA_DATA_ROOT (the conf/data presets read ${HICRA_DATA_ROOT}/...).
export HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}
export HICRA_DATA_ROOT=${HICRA_DATA_ROOT:-/data}
