#!/usr/bin/env bash
# The Ray head of docker/compose.yaml (both profiles), run in the image's repository copy.
#
#   docker/ray_head.sh            a Ray auth token made once into ~/.ray (the ray-auth volume: RAY_AUTH_MODE=token
#                                 needs one), then `ray start --head --block`, job API on the container's every
#                                 interface (compose publishes it on the host's 127.0.0.1), plus $RAY_HEAD_ARGS
#   docker/ray_head.sh --ready    exit 0 when the job API answers an authenticated `GET /api/jobs/` (what
#                                 `ray job list` asks, for 0.03 CPU-seconds instead of 1.5: the healthcheck)
#
# Ray gives its raylet a fixed 30 s to register with the GCS. Where other work keeps the CPUs busy, containers get
# a small share of them and a start can miss that deadline ("The current node timed out during startup"): a start
# that fails within 180 s is retried, RAY_HEAD_TRIES times in all (default 5). SIGTERM and SIGINT (docker stop)
# go to `ray start --block`, which stops Ray's processes. DASHBOARD_PORT: the job API's port in the container (8265).
set -uo pipefail
export DASHBOARD_PORT=${DASHBOARD_PORT:-8265}

if [[ ${1:-} == --ready ]]; then
  exec python - <<'PY'
import os
import pathlib
import urllib.request

token = (pathlib.Path.home() / ".ray" / "auth_token").read_text().strip()
request = urllib.request.Request(f"http://127.0.0.1:{os.environ['DASHBOARD_PORT']}/api/jobs/",
                                 headers={"authorization": f"Bearer {token}"})
urllib.request.urlopen(request, timeout=20).read()
PY
fi

TRIES=${RAY_HEAD_TRIES:-5}
read -r -a extra <<< "${RAY_HEAD_ARGS:-}"
ray get-auth-token --generate > /dev/null || exit 1

pid=
trap '[[ -n $pid ]] && kill -TERM "$pid" 2> /dev/null; wait "$pid"; exit 143' TERM INT
rc=1
for ((try = 1; try <= TRIES; try++)); do
  t0=$SECONDS
  ray start --head --block --port 6379 --dashboard-host 0.0.0.0 --dashboard-port "$DASHBOARD_PORT" --disable-usage-stats \
    ${extra[@]+"${extra[@]}"} &
  pid=$!
  wait "$pid"
  rc=$?
  ((SECONDS - t0 > 180)) && exit "$rc"   # it ran, then ended: not a start-up failure
  echo "ray_head.sh: ray start --head failed (exit $rc) after $((SECONDS - t0)) s, try $try of $TRIES" >&2
  ray stop --force > /dev/null 2>&1
  sleep "${RAY_HEAD_RETRY_SLEEP_S:-5}"
done
exit "$rc"
