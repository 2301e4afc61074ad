#!/usr/bin/env bash
# Prepare a Debian bookworm machine with no image registry for docker/compose.yaml (idempotent: every step
# is skipped when its result is already there). Run as root (apt, dockerd, debootstrap).
#
#   docker/prepare_host.sh            # then: make docker-cpu
#
#  1. Docker Engine: Debian's docker.io (dockerd 20.10) and debootstrap, with apt.
#  2. Compose v2 and buildx: bookworm only has compose v1, so Debian trixie's docker-compose (2.x) and
#     docker-buildx packages are fetched with `apt-get download` through a separate apt configuration (the
#     system's sources are not touched) and installed with `dpkg -i` (they need only libc6 >= 2.34).
#  3. dockerd, started in the background at niceness 10 (builds and containers yield to other work)
#     when no daemon answers; its pid is in $STATE/dockerd.pid, its log in $STATE/dockerd.log.
#  4. A Python base image, $BASE_TAG, without a registry: debootstrap (minbase) of bookworm from the
#     Debian mirror apt uses, `docker import`, then Debian's python3 (3.11), venv, headers and
#     ca-certificates, with this host's extra CA certificates (/usr/local/share/ca-certificates: HTTPS from
#     inside a container goes through the same interception proxy as the host's).
#  5. docker/wheels/: a hard link to the torch wheel that this host's pip finds (`pip config list`:
#     find-links); $ENV_FILE: the compose variables for this machine (base image, package indexes), which
#     `make docker-cpu` passes with --env-file. The values are printed too.
#
# Environment: HICRA_BASE_TAG (local/python:3.11-bookworm), HICRA_DOCKER_ENV (docker/local.env),
# HICRA_DOCKER_STATE (/var/lib/hicra-docker), DEBIAN_MIRROR (from apt's sources), TRIXIE_MIRROR (same).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_TAG=${HICRA_BASE_TAG:-local/python:3.11-bookworm}
ENV_FILE=${HICRA_DOCKER_ENV:-$ROOT/docker/local.env}
STATE=${HICRA_DOCKER_STATE:-/var/lib/hicra-docker}
CA_DIR=/usr/local/share/ca-certificates

say() { echo "prepare_host: $*" >&2; }
die() { say "$*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (apt-get, dockerd and debootstrap need it)"
mkdir -p "$STATE"

apt_mirror() {  # the first Debian archive URI apt uses (deb822 or one-line sources)
  local uri
  uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  [[ -n $uri ]] || uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}

# ---- 1. docker.io, debootstrap
missing=()
command -v dockerd > /dev/null || missing+=(docker.io)
command -v debootstrap > /dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi

# ---- 2. compose v2 and buildx from trixie, through a separate apt configuration
if ! docker compose version > /dev/null 2>&1 || ! docker buildx version > /dev/null 2>&1; then
  apt_dir=$STATE/apt-trixie
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs"
  cat > "$apt_dir/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${TRIXIE_MIRROR:-$MIRROR} trixie main
EOF
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent -o APT::Sandbox::User=root
            -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
  say "fetching docker-compose (v2) and docker-buildx from trixie"
  apt-get "${apt_opts[@]}" update -qq
  (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download docker-compose docker-buildx)
  dpkg -i "$apt_dir"/debs/docker-compose_*.deb "$apt_dir"/debs/docker-buildx_*.deb > /dev/null
  docker compose version > /dev/null && docker buildx version > /dev/null \
    || die "docker compose / docker buildx still missing after installing trixie's packages"
fi

# ---- 3. dockerd
if ! docker info > /dev/null 2>&1; then
  # niceness 10 whatever this script's own (nice -n adds to it): low enough for other work to come first,
  # high enough for Ray's head to start within its fixed 30 s on a busy machine (at 19 it timed out here)
  say "starting dockerd (niceness 10; log $STATE/dockerd.log)"
  nohup nice -n $((10 - $(nice))) dockerd > "$STATE/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$STATE/dockerd.pid"
  for _ in $(seq 60); do
    docker info > /dev/null 2>&1 && break
    kill -0 "$(cat "$STATE/dockerd.pid")" 2> /dev/null || die "dockerd exited: $(tail -n 5 "$STATE/dockerd.log")"
    sleep 1
  done
  docker info > /dev/null 2>&1 || die "dockerd does not answer after 60 s: $(tail -n 5 "$STATE/dockerd.log")"
fi

# ---- 4. the base image
if ! docker image inspect "$BASE_TAG" > /dev/null 2>&1; then
  debian_tag=local/debian:bookworm
  if ! docker image inspect "$debian_tag" > /dev/null 2>&1; then
    rootfs=$(mktemp -d "$STATE/rootfs.XXXXXX")
    say "debootstrap bookworm from $MIRROR (~30 s)"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$STATE/debootstrap.log" 2>&1 \
      || die "debootstrap failed: $(tail -n 5 "$STATE/debootstrap.log")"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$debian_tag" > /dev/null
    rm -rf "$rootfs"
  fi
  ctx=$(mktemp -d "$STATE/base.XXXXXX")
  mkdir "$ctx/certs"
  cp "$CA_DIR"/*.crt "$ctx/certs/" 2> /dev/null || true
  cat > "$ctx/Dockerfile" <<EOF
FROM $debian_tag
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
# this host's extra CA certificates: HTTPS from containers passes the same interception proxy
COPY certs/ $CA_DIR/
RUN apt-get update \\
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv python3-dev python-is-python3 \\
    && update-ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
# pip and requests use certifi's bundle unless told to use the system's (which has the extra certificates)
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
  say "building $BASE_TAG (Debian python3 + venv + headers + CA certificates)"
  docker build -q -t "$BASE_TAG" "$ctx" > /dev/null
  rm -rf "$ctx"
fi

# ---- 5. the local torch wheel, and the compose variables for this machine
# torch 2.13.0+cpu is not on PyPI and PyTorch's index is unreachable here: the host's pip finds it in its
# find-links folder (`pip config list`); the image build finds it in docker/wheels/ (a hard link, no copy)
pip_cmd=$(command -v pip3 || command -v pip || true)
wheels=${PIP_FIND_LINKS:-}
if [[ -z $wheels && -n $pip_cmd ]]; then
  wheels=$("$pip_cmd" config list 2> /dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'$/\1/p" | head -n1 || true)
fi
wheels=${wheels%% *}
found=0
for whl in "${wheels:-/nonexistent}"/torch-*.whl; do
  [[ -f $whl ]] || continue
  found=1
  [[ -f $ROOT/docker/wheels/$(basename "$whl") ]] && continue
  ln -f "$whl" "$ROOT/docker/wheels/" 2> /dev/null || cp -f "$whl" "$ROOT/docker/wheels/"
  say "linked $whl into docker/wheels/"
done
((found)) || say "no torch wheel in pip's find-links (${wheels:-none}): the build takes torch from the index"
cat > "$ENV_FILE" <<EOF
# written by docker/prepare_host.sh for this machine: docker compose --env-file $ENV_FILE ...
HICRA_BASE_IMAGE=$BASE_TAG
HICRA_PIP_INDEX_URL=https://pypi.org/simple
HICRA_PIP_EXTRA_INDEX_URL=
EOF
say "compose variables for this machine (also in $ENV_FILE):"
grep -v '^#' "$ENV_FILE"
